#!/usr/bin/env escript
%%! -noinput
%%
%% The benchmark's BEAM host: one worker behind a real Erlang port, opened the
%% way an application opens it, every figure timed from the BEAM's send.
%% Needs only Debian's erlang-base; msgpack is the minimal codec at the end.
%%
%% Usage:
%%   port_driver.escript drive EXECUTABLE [ARG...]
%%     Opens the port and waits for `ready`, then prints one JSON line
%%     {"event":"ready","ms":M,"os_pid":P}.  After that it reads one command
%%     per line on stdin ("SCENARIO INT..." below) and answers each with one
%%     JSON line: {"value":X,...} or {"error":"..."}.  End of input closes the
%%     port, waits for the worker to go, and halts.
%%   port_driver.escript codec
%%     Packet-4 frames on stdin: each is decoded and encoded again to stdout
%%     (tests/test_bench_driver.py checks the codec against Python's msgpack).
%%
%% Scenarios (the worker is `bridge serve --diagnostics` or bench/floor.py):
%%   warm                      wait for `stats` to say warm (workers without `stats`: at once)
%%   echo_seq N                median echo round trip, 1 in flight (µs)
%%   echo_pipe N DEPTH         echo round trips/s, DEPTH in flight
%%   stream N SIZE             stream_count chunks/s (SIZE 0: int chunks, else SIZE-byte chunks)
%%   first_chunk N             median send -> first chunk of stream_count n=1 (ms)
%%   tool N LANES              rpc_loop tool round trips/s, LANES in flight, answered here
%%   start_ready               a fresh port of the same executable: open_port -> `ready` (ms)
%%   ping_load PINGS STREAMS LANES
%%                             ping p50/p99 (ms) while STREAMS dspy.stream requests and a
%%                             LANES-wide dspy.batch run on the scripted engine (1 ms per token)
%%   predict N                 N sequential dspy.predict on the scripted engine: µs per call

-mode(compile).  % interpreted, an escript takes about 0.5 ms to decode a frame
-define(WAIT, 60000).  % ms any single frame may take before the driver gives up

main(["drive", Exe | Args]) ->
    Up = open_port({fd, 0, 1}, [{line, 1024}, binary, eof]),
    {Port, Ready, Ms} = open_worker(Exe, Args),
    {os_pid, Pid} = erlang:port_info(Port, os_pid),
    reply(Up, #{event => ready, ms => Ms, os_pid => Pid}),
    serve(Up, #{port => Port, ready => Ready, pid => Pid, exe => Exe, args => Args});
main(["codec"]) ->
    Up = open_port({fd, 0, 1}, [{packet, 4}, binary, eof]),
    codec(Up);
main(_) ->
    io:format(standard_error, "usage: port_driver.escript drive EXECUTABLE [ARG...] | codec~n", []),
    halt(2).

codec(Up) ->
    receive
        {Up, {data, Frame}} -> port_command(Up, enc(decode(Frame))), codec(Up);
        {Up, eof} -> halt(0)
    end.

%% ---- the command loop -------------------------------------------------------------

serve(Up, S = #{port := Port, pid := Pid}) ->
    receive
        {Up, {data, {eol, Line}}} ->
            [Name | Ints] = binary:split(Line, <<" ">>, [global, trim_all]),
            Answer = try scenario(Name, [binary_to_integer(I) || I <- Ints], S)
                     catch Class:Why:Stack -> #{error => iolist_to_binary(
                                                   io_lib:format("~p:~p ~P", [Class, Why, Stack, 8]))}
                     end,
            reply(Up, Answer),
            serve(Up, S);
        {Up, eof} ->
            port_close(Port),
            wait_gone(Pid),
            halt(0)
    end.

scenario(<<"warm">>, [], S) -> warm(S), #{value => 0};
scenario(<<"echo_seq">>, [N], #{port := P}) ->
    Req = request(<<"seq">>, <<"echo">>, #{<<"x">> => 1}),
    #{value => median([timed(fun() -> port_command(P, Req), frame(P) end) || _ <- lists:seq(1, N)]) / 1.0e3};
scenario(<<"echo_pipe">>, [N, Depth], #{port := P}) ->
    {First, Rest} = lists:split(min(Depth, N),
                                [request(I, <<"echo">>, #{<<"x">> => I}) || I <- lists:seq(1, N)]),
    T0 = now_ns(),
    [port_command(P, R) || R <- First],
    #{<<"type">> := <<"result">>} = decode(pipe(P, N, Rest)),
    #{value => rate(N, T0)};
scenario(<<"stream">>, [N, Size], #{port := P}) ->
    Args = case Size of 0 -> #{<<"n">> => N}; _ -> #{<<"n">> => N, <<"size">> => Size} end,
    T0 = now_ns(),
    port_command(P, request(<<"stream">>, <<"stream_count">>, Args)),
    [frame(P) || _ <- lists:seq(1, N)],
    #{<<"type">> := <<"result">>, <<"id">> := <<"stream">>} = decode(frame(P)),
    #{value => rate(N, T0)};
scenario(<<"first_chunk">>, [N], #{port := P}) ->
    Req = request(<<"first">>, <<"stream_count">>, #{<<"n">> => 1}),
    Samples = [begin T = timed(fun() -> port_command(P, Req), frame(P) end), frame(P), T end
               || _ <- lists:seq(1, N)],
    #{value => median(Samples) / 1.0e6};
scenario(<<"tool">>, [N, Lanes], #{port := P}) ->
    T0 = now_ns(),
    port_command(P, request(<<"rpc">>, <<"rpc_loop">>, #{<<"n">> => N, <<"concurrency">> => Lanes})),
    #{<<"n">> := N} = answer_tools(P),
    #{value => rate(N, T0)};
scenario(<<"start_ready">>, [], #{exe := Exe, args := Args}) ->
    {Port, _, Ms} = open_worker(Exe, Args),
    {os_pid, Pid} = erlang:port_info(Port, os_pid),
    port_close(Port),
    wait_gone(Pid),
    #{value => Ms};
scenario(<<"ping_load">>, [Pings, Streams, Lanes], #{port := P}) ->
    ping_load(P, Pings, Streams, Lanes);
scenario(<<"predict">>, [N], #{port := P}) ->
    configure(P, #{}),
    Req = request(<<"d">>, <<"dspy.predict">>, #{<<"signature">> => <<"question -> answer">>,
                                                 <<"inputs">> => #{<<"question">> => <<"q">>}}),
    Once = fun() -> port_command(P, Req), #{<<"type">> := <<"result">>} = terminal(P, <<"d">>) end,
    [Once() || _ <- lists:seq(1, 20)],  % warm: first calls build DSPy's caches
    T0 = now_ns(),
    [Once() || _ <- lists:seq(1, N)],
    #{value => (now_ns() - T0) / N / 1.0e3}.

%% ---- steps ------------------------------------------------------------------------

open_worker(Exe, Args) ->
    T0 = now_ns(),
    Port = open_port({spawn_executable, Exe}, [{packet, 4}, binary, exit_status, {args, Args}]),
    Ready = #{<<"type">> := <<"ready">>} = decode(frame(Port)),
    {Port, Ready, (now_ns() - T0) / 1.0e6}.

warm(S = #{port := P, ready := Ready}) ->
    case lists:member(<<"stats">>, maps:get(<<"commands">>, Ready, [])) of
        false -> ok;
        true ->
            port_command(P, request(<<"warm">>, <<"stats">>, #{})),
            case terminal(P, <<"warm">>) of
                #{<<"data">> := #{<<"warm">> := true}} -> ok;
                _ -> receive after 20 -> warm(S) end
            end
    end.

pipe(P, 1, []) -> frame(P);
pipe(P, Left, []) -> frame(P), pipe(P, Left - 1, []);
pipe(P, Left, [R | Rest]) -> frame(P), port_command(P, R), pipe(P, Left - 1, Rest).

answer_tools(P) ->
    case decode(frame(P)) of
        #{<<"type">> := <<"rpc_request">>, <<"rpc_id">> := Rpc, <<"args">> := [A | _]} ->
            port_command(P, enc(#{<<"type">> => <<"rpc_response">>, <<"rpc_id">> => Rpc,
                                  <<"ok">> => true, <<"result">> => A})),
            answer_tools(P);
        #{<<"type">> := <<"result">>, <<"id">> := <<"rpc">>, <<"data">> := Data} -> Data
    end.

configure(P, Options) ->
    Script = [#{<<"when">> => #{}, <<"reply">> => #{<<"answer">> => answer_text()}}],
    port_command(P, request(<<"cfg">>, <<"lm.configure">>,
                            Options#{<<"model">> => <<"scripted/bench">>, <<"script">> => Script})),
    #{<<"type">> := <<"result">>} = terminal(P, <<"cfg">>).

answer_text() ->
    iolist_to_binary(lists:join(<<" ">>, [<<"word", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 20)])).

%% The load: every stream and the batch is sent again as soon as it ends, so it
%% runs for the whole measurement; the gaps between pings keep the mailbox drained.
ping_load(P, Pings, Streams, Lanes) ->
    configure(P, #{<<"token_delay_ms">> => 1}),
    Ask = #{<<"signature">> => <<"question -> answer">>},
    Items = [#{<<"question">> => <<"q", (integer_to_binary(I))/binary>>} || I <- lists:seq(1, 20000)],
    Load = maps:from_list(
             [{<<"batch">>, request(<<"batch">>, <<"dspy.batch">>,
                                    Ask#{<<"items">> => Items, <<"concurrency">> => Lanes})}
              | [{Id, request(Id, <<"dspy.stream">>, Ask#{<<"inputs">> => #{<<"question">> => Id}})}
                 || K <- lists:seq(1, Streams), Id <- [<<"s", (integer_to_binary(K))/binary>>]]]),
    [port_command(P, R) || R <- maps:values(Load)],
    Busy = pump_until_items(P, Load, 2 * Lanes),
    T0 = now_ns(),
    Ms = [ping(P, Load, I) || I <- lists:seq(1, Pings)],
    Seconds = (now_ns() - T0) / 1.0e9,
    Chunks = erase(chunks),
    [port_command(P, enc(#{<<"type">> => <<"cancel">>, <<"id">> => Id})) || Id <- maps:keys(Load)],
    ended(P, maps:keys(Load)),
    Sorted = lists:sort(Ms),
    #{p50 => lists:nth(Pings div 2 + 1, Sorted), p99 => lists:nth(min(Pings, Pings * 99 div 100 + 1), Sorted),
      load_frames_per_s => (Chunks - Busy) / Seconds}.

ping(P, Load, I) ->
    pump(P, Load, now_ns() + 2000000),
    T0 = now_ns(),
    port_command(P, request(I, <<"ping">>, #{})),
    wait_ping(P, Load, I),
    (now_ns() - T0) / 1.0e6.

pump_until_items(P, Load, Want) ->
    put(chunks, 0), put(items, 0),
    pump_items(P, Load, Want).

pump_items(P, Load, Want) ->
    case get(items) >= Want of
        true -> get(chunks);
        false -> load_frame(P, Load, decode(frame(P))), pump_items(P, Load, Want)
    end.

pump(P, Load, Deadline) ->
    Left = max(0, (Deadline - now_ns()) div 1000000),
    receive {P, {data, F}} -> load_frame(P, Load, decode(F)), pump(P, Load, Deadline)
    after Left -> ok
    end.

wait_ping(P, Load, I) ->
    case decode(frame(P)) of
        #{<<"id">> := I, <<"type">> := <<"result">>} -> ok;
        F -> load_frame(P, Load, F), wait_ping(P, Load, I)
    end.

%% A frame of the load: counted; a finished request is sent again, a failed one stops the run.
load_frame(P, Load, #{<<"id">> := Id, <<"type">> := Type} = F) ->
    put(chunks, get(chunks) + 1),
    case Type of
        <<"chunk">> when Id =:= <<"batch">> -> put(items, get(items) + 1);
        <<"chunk">> -> ok;
        <<"result">> -> port_command(P, maps:get(Id, Load));
        _ -> error({load_failed, F})
    end.

terminal(P, Id) ->
    case decode(frame(P)) of
        #{<<"id">> := Id, <<"type">> := T} = F when T =:= <<"result">>; T =:= <<"error">> -> F;
        _ -> terminal(P, Id)
    end.

ended(_, []) -> ok;
ended(P, Ids) ->
    case decode(frame(P)) of
        #{<<"id">> := Id, <<"type">> := T} when T =/= <<"chunk">> -> ended(P, lists:delete(Id, Ids));
        _ -> ended(P, Ids)
    end.

frame(P) ->
    receive
        {P, {data, F}} -> F;
        {P, {exit_status, N}} -> error({worker_exited, N})
    after ?WAIT -> error(no_frame_within_60s)
    end.

wait_gone(Pid) ->
    case file:read_file("/proc/" ++ integer_to_list(Pid) ++ "/stat") of
        {ok, Stat} ->
            [_, After] = string:split(Stat, <<")">>, trailing),
            case lists:member(binary:at(After, 1), "ZX") of
                true -> ok;
                false -> receive after 1 -> wait_gone(Pid) end
            end;
        {error, _} -> ok
    end.

request(Id, Command, Args) ->
    iolist_to_binary(enc(#{<<"type">> => <<"request">>, <<"id">> => Id,
                           <<"command">> => Command, <<"args">> => Args})).

now_ns() -> erlang:monotonic_time(nanosecond).

timed(Fun) -> T0 = now_ns(), Fun(), now_ns() - T0.

rate(N, T0) -> N / ((now_ns() - T0) / 1.0e9).

median(Xs) -> lists:nth(length(Xs) div 2 + 1, lists:sort(Xs)).

%% One JSON line: a flat map of atom keys to numbers, atoms or UTF-8 binaries.
reply(Up, Map) ->
    Pairs = [[$", atom_to_binary(K), "\":", json(V)] || {K, V} <- maps:to_list(Map)],
    port_command(Up, [${, lists:join($,, Pairs), "}\n"]).

json(V) when is_integer(V) -> integer_to_binary(V);
json(V) when is_float(V) -> float_to_binary(V, [short]);
json(V) when is_atom(V) -> json(atom_to_binary(V));
json(V) when is_binary(V) ->
    [$", [case C of $" -> "\\\""; $\\ -> "\\\\"; _ when C < 32 -> " "; _ -> C end
          || <<C>> <= V], $"].

%% ---- msgpack: just what the protocol uses ------------------------------------------
%% Erlang -> msgpack: binary -> str, {bin, B} -> bin, nil/true/false, integers, floats
%% (float64), lists -> array, maps -> map.  Decoding is the inverse (float32 too).

enc(nil) -> <<16#c0>>;
enc(false) -> <<16#c2>>;
enc(true) -> <<16#c3>>;
enc(I) when is_integer(I), I >= 0, I < 128 -> <<I>>;
enc(I) when is_integer(I), I >= -32, I < 0 -> <<I:8/signed>>;
enc(I) when is_integer(I), I >= 0 -> sized(I, [{8, 16#cc}, {16, 16#cd}, {32, 16#ce}, {64, 16#cf}], unsigned);
enc(I) when is_integer(I) -> sized(I, [{8, 16#d0}, {16, 16#d1}, {32, 16#d2}, {64, 16#d3}], signed);
enc(F) when is_float(F) -> <<16#cb, F:64/float>>;
enc(B) when is_binary(B) -> [head(byte_size(B), 16#a0, 32, [{8, 16#d9}, {16, 16#da}, {32, 16#db}]), B];
enc({bin, B}) -> [head(byte_size(B), none, 0, [{8, 16#c4}, {16, 16#c5}, {32, 16#c6}]), B];
enc(A) when is_atom(A) -> enc(atom_to_binary(A));
enc(L) when is_list(L) -> [head(length(L), 16#90, 16, [{16, 16#dc}, {32, 16#dd}]) | [enc(X) || X <- L]];
enc(M) when is_map(M) ->
    [head(map_size(M), 16#80, 16, [{16, 16#de}, {32, 16#df}]) | [[enc(K), enc(V)] || {K, V} <- maps:to_list(M)]].

sized(I, [{Bits, Tag} | More], Sign) ->
    Fits = case Sign of unsigned -> I < 1 bsl Bits; signed -> I >= -(1 bsl (Bits - 1)) end,
    case Fits orelse More =:= [] of
        true when Sign =:= unsigned -> <<Tag, I:Bits>>;
        true -> <<Tag, I:Bits/signed>>;
        false -> sized(I, More, Sign)
    end.

head(N, Fix, Max, _) when N < Max -> <<(Fix bor N)>>;
head(N, _, _, [{Bits, Tag} | More]) when N < 1 bsl Bits; More =:= [] -> <<Tag, N:Bits>>;
head(N, Fix, Max, [_ | More]) -> head(N, Fix, Max, More).

decode(Bin) -> {Term, <<>>} = dec(Bin), Term.

dec(<<16#c0, R/binary>>) -> {nil, R};
dec(<<16#c2, R/binary>>) -> {false, R};
dec(<<16#c3, R/binary>>) -> {true, R};
dec(<<0:1, I:7, R/binary>>) -> {I, R};
dec(<<2#111:3, I:5, R/binary>>) -> {I - 32, R};
dec(<<2#1000:4, N:4, R/binary>>) -> pairs(N, R, #{});
dec(<<2#1001:4, N:4, R/binary>>) -> items(N, R, []);
dec(<<2#101:3, N:5, S:N/binary, R/binary>>) -> {S, R};
dec(<<16#c4, N:8, S:N/binary, R/binary>>) -> {{bin, S}, R};
dec(<<16#c5, N:16, S:N/binary, R/binary>>) -> {{bin, S}, R};
dec(<<16#c6, N:32, S:N/binary, R/binary>>) -> {{bin, S}, R};
dec(<<16#ca, F:32/float, R/binary>>) -> {F, R};
dec(<<16#cb, F:64/float, R/binary>>) -> {F, R};
dec(<<16#cc, I:8, R/binary>>) -> {I, R};
dec(<<16#cd, I:16, R/binary>>) -> {I, R};
dec(<<16#ce, I:32, R/binary>>) -> {I, R};
dec(<<16#cf, I:64, R/binary>>) -> {I, R};
dec(<<16#d0, I:8/signed, R/binary>>) -> {I, R};
dec(<<16#d1, I:16/signed, R/binary>>) -> {I, R};
dec(<<16#d2, I:32/signed, R/binary>>) -> {I, R};
dec(<<16#d3, I:64/signed, R/binary>>) -> {I, R};
dec(<<16#d9, N:8, S:N/binary, R/binary>>) -> {S, R};
dec(<<16#da, N:16, S:N/binary, R/binary>>) -> {S, R};
dec(<<16#db, N:32, S:N/binary, R/binary>>) -> {S, R};
dec(<<16#dc, N:16, R/binary>>) -> items(N, R, []);
dec(<<16#dd, N:32, R/binary>>) -> items(N, R, []);
dec(<<16#de, N:16, R/binary>>) -> pairs(N, R, #{});
dec(<<16#df, N:32, R/binary>>) -> pairs(N, R, #{}).

items(0, R, Acc) -> {lists:reverse(Acc), R};
items(N, R, Acc) -> {X, R1} = dec(R), items(N - 1, R1, [X | Acc]).

pairs(0, R, Acc) -> {Acc, R};
pairs(N, R, Acc) -> {K, R1} = dec(R), {V, R2} = dec(R1), pairs(N - 1, R2, Acc#{K => V}).
