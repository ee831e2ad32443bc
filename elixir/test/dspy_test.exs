defmodule DSPyBridge.DSPyTest do
  use ExUnit.Case, async: true

  import DSPyBridge.TestHelpers
  alias DSPyBridge.{Composer, DSPy, Error}

  setup_all do
    %{w: start_worker!()}
  end

  setup %{w: w} do
    session = "s#{System.unique_integer([:positive])}"

    %{
      w: w,
      s: [session_id: session],
      configure: &DSPy.configure_lm(w, "scripted/demo", %{"script" => &1}, session_id: session)
    }
  end

  test "configure_lm, predict and chain_of_thought", %{w: w, s: s, configure: configure} do
    assert {:error, %Error{type: "lm_not_configured"}} =
             DSPy.predict(w, "question -> answer", %{question: "?"}, s)

    assert {:ok, %{"model" => "scripted/demo"}} =
             configure.([%{"answer" => "4"}, %{"reasoning" => "2+2", "answer" => "4"}])

    assert {:ok, %{"answer" => "4"}} =
             DSPy.predict(w, "question -> answer", %{question: "2+2?"}, s)

    assert {:ok, %{"reasoning" => "2+2", "answer" => "4"}} =
             DSPy.chain_of_thought(w, "question -> answer", %{question: "2+2?"}, s)
  end

  test "stream_chain_of_thought: tokens concatenate to the outputs, as a stream and with a callback",
       %{w: w, s: s, configure: configure} do
    reply = %{"reasoning" => "Two plus two is four.", "answer" => "The answer is 4"}
    {:ok, _} = configure.([reply, reply])

    events =
      DSPy.stream_chain_of_thought(w, "question -> answer", %{question: "2+2?"}, s)
      |> Enum.to_list()

    assert {:complete, ^reply} = List.last(events)
    assert Enum.any?(events, &match?({:status, _}, &1))
    for {field, value} <- reply, do: assert(tokens(events, field) == value)
    assert Enum.count(events, &match?({:token, "answer", _}, &1)) > 1

    me = self()
    callback = fn event -> send(me, {:event, event}) end

    assert {:ok, ^reply} =
             DSPy.stream_chain_of_thought(
               w,
               "question -> answer",
               %{question: "2+2?"},
               [callback: callback] ++ s
             )

    received = collect_events()
    assert tokens(received, "answer") == reply["answer"]
    assert List.last(received) == {:complete, reply}
  end

  test "an error mid-stream raises from the Enumerable, and is returned with a callback",
       %{w: w, s: s, configure: configure} do
    {:ok, _} = configure.([])

    assert_raise Error, ~r/lm_error/, fn ->
      DSPy.stream_chain_of_thought(w, "q -> a", %{q: "?"}, s) |> Enum.to_list()
    end

    assert {:error, %Error{type: "lm_error"}} =
             DSPy.stream_chain_of_thought(w, "q -> a", %{q: "?"}, [callback: & &1] ++ s)
  end

  test "stream_batch_predict with a failing item", %{w: w, s: s, configure: configure} do
    {:ok, _} =
      configure.([
        %{"when" => %{"question" => "a"}, "reply" => %{"answer" => "A"}},
        %{"when" => %{"question" => "b"}, "reply" => %{"raw" => "no sections here"}},
        %{"when" => %{"question" => "c"}, "reply" => %{"answer" => "C"}}
      ])

    items = [%{question: "a"}, %{question: "b"}, %{question: "c"}]

    events =
      DSPy.stream_batch_predict(w, "question -> answer", items, [concurrency: 2] ++ s)
      |> Enum.to_list()

    assert {:complete, %{"total" => 3, "succeeded" => 2, "failed" => 1}} = List.last(events)
    outputs = for {:item, i, o, _} <- events, into: %{}, do: {i, o}
    assert outputs == %{0 => %{"answer" => "A"}, 2 => %{"answer" => "C"}}

    assert [{:item_error, 1, %Error{type: "adapter_parse_error"}, _}] =
             for(e = {:item_error, _, _, _} <- events, do: e)

    assert events |> Enum.drop(-1) |> Enum.map(fn e -> elem(e, 3)["done"] end) == [1, 2, 3]
  end

  test "a Composer pipeline with a branch and a parallel step", %{
    w: w,
    s: s,
    configure: configure
  } do
    {:ok, _} =
      configure.([
        %{
          "when" => %{"text" => "hello there", "label" => "ham"},
          "reply" => %{"summary" => "A greeting."}
        },
        %{"when" => %{"text" => "buy now"}, "reply" => %{"label" => "spam"}},
        %{"when" => %{"text" => "hello there"}, "reply" => %{"label" => "ham"}},
        %{
          "when" => %{"label" => "spam"},
          "reply" => %{"reasoning" => "It sells.", "reply" => "Blocked."}
        },
        %{"when" => %{"label" => "ham"}, "reply" => %{"tone" => "warm"}}
      ])

    pipeline =
      Composer.new()
      |> Composer.predict("classify", "text -> label")
      |> Composer.branch(
        "label == 'spam'",
        &Composer.chain_of_thought(&1, "refuse", "label -> reply"),
        &Composer.parallel(&1, [
          {nil, Composer.predict(Composer.new(), "summarize", "text, label -> summary")},
          {"style", Composer.predict(Composer.new(), "tone", "label -> tone")}
        ])
      )

    assert [
             %{"name" => "classify"},
             %{
               "branch" => %{
                 "if" => "label == 'spam'",
                 "then" => [_],
                 "else" => [%{"parallel" => [[_], %{"as" => "style"}]}]
               }
             }
           ] = Composer.to_spec(pipeline)

    assert {:ok, %{"label" => "spam", "reply" => "Blocked.", "reasoning" => "It sells."}} =
             Composer.run(pipeline, w, %{text: "buy now"}, s)

    events = Composer.stream(pipeline, w, %{text: "hello there"}, s) |> Enum.to_list()

    assert [{:step, "classify", %{"label" => "ham"}}, {:branch, "label == 'spam'", :else} | rest] =
             events

    assert {:complete, %{"summary" => "A greeting.", "style" => %{"tone" => "warm"}}} =
             List.last(rest)

    assert Enum.sort(Enum.drop(rest, -1)) == [
             {:step, "summarize", %{"summary" => "A greeting."}},
             {:step, "tone", %{"tone" => "warm"}}
           ]
  end

  test "programs by reference: create, call, save, load; close_session", %{
    w: w,
    s: s,
    configure: configure
  } do
    {:ok, _} = configure.([%{"when" => %{"question" => "q"}, "reply" => %{"answer" => "a"}}])

    assert {:ok, ref} =
             DSPy.create_program(
               w,
               "Predict",
               "question -> answer",
               [instructions: "Answer briefly."] ++ s
             )

    assert {:ok, %{"answer" => "a"}} = DSPy.call_program(w, ref, %{question: "q"}, s)
    assert {:ok, state} = DSPy.save_program(w, ref, s)
    assert {:ok, ref2} = DSPy.load_program(w, "Predict", "question -> answer", state, s)
    assert ref2 != ref
    assert {:ok, %{"answer" => "a"}} = DSPy.call_program(w, ref2, %{question: "q"}, s)
    assert :ok = DSPy.close_session(w, s[:session_id])
    # the first request in a closed session says so, once; the session then starts afresh
    assert {:error, %Error{type: "unknown_session", details: %{"reason" => "closed"}}} =
             DSPy.call_program(w, ref, %{question: "q"}, s)

    assert {:error, %Error{type: "unknown_ref"}} = DSPy.call_program(w, ref, %{question: "q"}, s)
  end

  defp collect_events do
    receive do
      {:event, event} -> [event | collect_events()]
    after
      0 -> []
    end
  end

  defp tokens(events, field), do: for({:token, ^field, text} <- events, into: "", do: text)
end
