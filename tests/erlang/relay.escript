#!/usr/bin/env escript
%%! -noinput
%%
%% Test relay: runs the bridge worker as a real Erlang port and relays its
%% frames to and from the Python test, which talks to this escript over the
%% escript's own stdin/stdout, framed {packet,4} by an {fd,0,1} port.
%% msgpack stays in Python: worker frames pass through as opaque binaries.
%%
%% Usage: relay.escript stdio|nouse_stdio EXECUTABLE [ARG...]
%%
%% Every packet-4 frame on either side starts with one tag byte.
%%
%%   Relay -> Python
%%     <<0, Body/binary>>      a frame the worker sent (Body is its packet-4 payload)
%%     <<1, N:32/signed>>      {Port, {exit_status, N}}
%%     <<2, OsPid:32>>         the worker's port is open; its OS pid (sent first)
%%     <<3>>                   port_close(Port) has returned
%%     <<4, Text/binary>>      a relay-side problem, as UTF-8 text
%%
%%   Python -> Relay
%%     <<0, Body/binary>>      send Body to the worker as one frame
%%     <<1>>                   port_close(Port) now, then reply <<3>>
%%     end of input            halt (the VM closes the worker's port, if still open)

main([Mode, Exe | Args]) ->
    process_flag(trap_exit, true),
    Up = open_port({fd, 0, 1}, [{packet, 4}, binary]),
    Io = case Mode of
             "stdio" -> use_stdio;
             "nouse_stdio" -> nouse_stdio
         end,
    Worker = open_port({spawn_executable, Exe},
                       [{packet, 4}, binary, exit_status, Io, {args, Args}]),
    {os_pid, OsPid} = erlang:port_info(Worker, os_pid),
    port_command(Up, <<2, OsPid:32>>),
    loop(Up, Worker);
main(_) ->
    io:format(standard_error, "usage: relay.escript stdio|nouse_stdio EXECUTABLE [ARG...]~n", []),
    halt(2).

loop(Up, Worker) ->
    receive
        {Worker, {data, Body}} ->
            port_command(Up, [0, Body]),
            loop(Up, Worker);
        {Worker, {exit_status, N}} ->
            port_command(Up, <<1, N:32/signed>>),
            loop(Up, Worker);
        {Up, {data, <<0, Body/binary>>}} ->
            try port_command(Worker, Body)
            catch error:Why -> problem(Up, "cannot send to the worker: ~p", [Why])
            end,
            loop(Up, Worker);
        {Up, {data, <<1>>}} ->
            try port_close(Worker)
            catch error:Why -> problem(Up, "port_close failed: ~p", [Why])
            end,
            port_command(Up, <<3>>),
            loop(Up, Worker);
        {Up, {data, Other}} ->
            problem(Up, "unknown command from the test: ~p", [Other]),
            loop(Up, Worker);
        {'EXIT', Up, _} ->
            halt(0);
        {'EXIT', Worker, normal} ->
            loop(Up, Worker);
        {'EXIT', Worker, Why} ->
            problem(Up, "worker port exited: ~p", [Why]),
            loop(Up, Worker);
        Other ->
            problem(Up, "unexpected message: ~p", [Other]),
            loop(Up, Worker)
    end.

problem(Up, Format, Args) ->
    port_command(Up, [4, unicode:characters_to_binary(io_lib:format(Format, Args))]).
