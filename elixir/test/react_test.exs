defmodule DSPyBridge.ReactTest do
  use ExUnit.Case, async: true

  import DSPyBridge.TestHelpers
  alias DSPyBridge.DSPy

  @script [
    %{
      "next_thought" => "Look it up.",
      "next_tool_name" => "search",
      "next_tool_args" => %{"query" => "tower"}
    },
    %{
      "next_thought" => "Compute.",
      "next_tool_name" => "calc",
      "next_tool_args" => %{"expression" => "330 * x"}
    },
    %{"next_thought" => "Ask the slow one.", "next_tool_name" => "slow", "next_tool_args" => %{}},
    %{"next_thought" => "Done.", "next_tool_name" => "finish", "next_tool_args" => %{}},
    %{"reasoning" => "The tower is 330 m.", "answer" => "330"}
  ]

  test "Elixir tools: one succeeds, one raises, one sleeps past its timeout and its task is killed" do
    w = start_worker!(args: ["--tool-timeout-ms", "300"])
    {:ok, _} = DSPy.configure_lm(w, "scripted/agent", %{"script" => @script ++ @script})
    me = self()
    object = %{"type" => "object", "properties" => %{"query" => %{"type" => "string"}}}

    tools = [
      %{
        name: "search",
        description: "Search.",
        parameters: object,
        fun: fn [], %{"query" => q} -> %{"hits" => ["#{q}: 330 m"]} end
      },
      %{
        name: "calc",
        description: "Arithmetic.",
        fun: fn [], %{"expression" => e} -> raise ArgumentError, "not arithmetic: #{e}" end
      },
      %{
        name: "slow",
        description: "Slow.",
        fun: fn _, _ -> send(me, {:slow, self()}) && Process.sleep(:infinity) end
      }
    ]

    callback = fn event -> send(me, {:event, event}) end
    inputs = %{question: "How tall is the tower?"}

    assert {:ok, %{"answer" => "330"}, trajectory} =
             DSPy.react(w, "question -> answer", inputs, tools, callback: callback)

    assert Enum.map(trajectory, & &1["tool"]) == ["search", "calc", "slow", "finish"]

    assert_received {:slow, slow}
    mon = Process.monitor(slow)
    assert_receive {:DOWN, ^mon, :process, ^slow, reason} when reason in [:killed, :noproc]

    events = collect()

    assert [{:thought, 1, "Look it up."}, {:tool_call, 1, "search", %{"query" => "tower"}} | _] =
             events

    observations = for {:observation, step, o} <- events, do: {step, o}

    assert [
             {1, {:ok, %{"hits" => ["tower: 330 m"]}}},
             {2,
              {:error,
               %{"type" => "exception", "message" => "ArgumentError: not arithmetic: 330 * x"}}},
             {3, {:error, %{"type" => "timeout"}}}
           ] = observations

    # without a callback: the same agent, one answer
    assert {:ok, %{"answer" => "330"}, [_, _, _, _]} =
             DSPy.react(w, "question -> answer", inputs, tools)
  end

  defp collect do
    receive do
      {:event, e} -> [e | collect()]
    after
      0 -> []
    end
  end
end
