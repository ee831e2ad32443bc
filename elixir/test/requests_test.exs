defmodule DSPyBridge.RequestsTest do
  use ExUnit.Case, async: true

  import DSPyBridge.TestHelpers
  alias DSPyBridge.{Error, Worker}

  setup do
    %{w: start_worker!(args: ["--diagnostics"])}
  end

  describe "stream" do
    test "yields the chunks, then the result", %{w: w} do
      assert DSPyBridge.stream(w, "stream_count", %{n: 3}, window: 64) |> Enum.to_list() ==
               [{:chunk, 0}, {:chunk, 1}, {:chunk, 2}, {:result, nil}]
    end

    test "each enumeration runs the request again, from the enumerating process", %{w: w} do
      stream = DSPyBridge.stream(w, "stream_count", %{n: 2})
      assert Enum.to_list(stream) == Enum.to_list(stream)
      task = Task.async(fn -> Enum.count(stream) end)
      assert Task.await(task) == 3
      {:ok, stats} = DSPyBridge.call(w, "stats", %{})
      assert stats["requests"]["stream_count"] == 3
    end

    test "100k chunks to a slow consumer: the mailbox never holds more than the window, RSS stays flat",
         %{w: w} do
      window = 64
      # DSPy is imported in the background after ready; lm.configure waits for that import
      {:ok, _} = DSPyBridge.call(w, "lm.configure", %{model: "scripted/x", script: []})

      {count, max_queue, rss} =
        w
        |> DSPyBridge.stream("stream_count", %{n: 100_000}, window: window)
        |> Enum.reduce({0, 0, []}, fn
          {:chunk, i}, {n, max_queue, rss} ->
            assert i == n
            # the consumer is slow now and then, so the worker fills the window
            if rem(i, 1000) == 0, do: receive(after: (1 -> :ok))
            {:message_queue_len, queue} = Process.info(self(), :message_queue_len)
            rss = if i in [10_000, 90_000], do: [rss_bytes(w) | rss], else: rss
            {n + 1, max(max_queue, queue), rss}

          {:result, nil}, acc ->
            acc
        end)

      assert count == 100_000
      assert max_queue <= window and max_queue > 0
      [late, early] = rss
      assert late - early < 8 * 1024 * 1024, "RSS grew from #{early} to #{late}"
    end

    test "Enum.take/2 cancels the rest and leaves no message", %{w: w} do
      stream = DSPyBridge.stream(w, "stream_count", %{n: 1_000_000}, window: 8)
      assert Enum.take(stream, 5) == Enum.map(0..4, &{:chunk, &1})
      refute_received {:dspy_bridge, _, _}
      await_stats(w, &(&1["in_flight"] == 0 and &1["errors"]["cancelled"] == 1))
    end

    test "an error frame raises DSPyBridge.Error and leaves no message", %{w: w} do
      assert_raise Error, ~r/unknown_command/, fn ->
        w |> DSPyBridge.stream("nope") |> Enum.to_list()
      end

      refute_received {:dspy_bridge, _, _}
    end

    test "telemetry frames are not yielded", %{w: w} do
      items = DSPyBridge.stream(w, "stream_count", %{n: 2}, telemetry: true) |> Enum.to_list()
      assert items == [{:chunk, 0}, {:chunk, 1}, {:result, nil}]
    end
  end

  describe "async" do
    test "a window holds the chunks until credit is granted", %{w: w} do
      {:ok, ref} = DSPyBridge.async(w, "stream_count", %{n: 10}, window: 3)
      for i <- 0..2, do: assert_receive({:dspy_bridge, ^ref, {:chunk, ^i}}, 5000)
      refute_receive {:dspy_bridge, ^ref, _}, 100
      :ok = DSPyBridge.credit(w, ref, 7)
      for i <- 3..9, do: assert_receive({:dspy_bridge, ^ref, {:chunk, ^i}}, 5000)
      assert_receive {:dspy_bridge, ^ref, {:result, nil}}, 5000
    end

    test "cancel: exactly one terminal message; unknown refs are :ok", %{w: w} do
      {:ok, ref} = DSPyBridge.async(w, "sleep", %{seconds: 10})
      :ok = DSPyBridge.cancel(w, ref)
      assert_receive {:dspy_bridge, ^ref, {:error, %Error{type: "cancelled"}}}, 5000
      assert :ok = DSPyBridge.cancel(w, ref)
      assert :ok = DSPyBridge.cancel(w, make_ref())
      {:ok, _} = DSPyBridge.call(w, "ping", %{})
      refute_received {:dspy_bridge, ^ref, _}
    end
  end

  describe "failure" do
    test "a caller killed mid-stream: the worker gets cancel and nothing stays in flight", %{w: w} do
      me = self()

      pid =
        spawn(fn ->
          w
          |> DSPyBridge.stream("stream_count", %{n: 1_000_000})
          |> Enum.each(fn _ ->
            send(me, :streaming)
            receive do: (:never -> :ok)
          end)
        end)

      assert_receive :streaming, 5000
      Process.exit(pid, :kill)
      await_stats(w, &(&1["in_flight"] == 0 and &1["errors"]["cancelled"] == 1))
    end

    test "callers killed at any point of a request leave nothing registered and nothing running",
         %{w: w} do
      # Killed after 0 to 30 yields: before registering, between registering and writing the
      # request (the caller writes it), or while its stream runs.
      for i <- 1..200 do
        pid = spawn(fn -> DSPyBridge.call(w, "stream_count", %{n: 100_000}, timeout: 60_000) end)
        for _ <- 1..rem(i * 7, 31)//1, do: :erlang.yield()
        Process.exit(pid, :kill)
      end

      eventually(fn -> nothing_registered?(w) end)

      await_stats(w, &(&1["in_flight"] == 0))
      assert {:ok, %{"pong" => true}} = DSPyBridge.call(w, "ping", %{})
    end

    test "timeout: gives exactly one timeout error", %{w: w} do
      assert {:error, %Error{type: "timeout"}} =
               DSPyBridge.call(w, "sleep", %{seconds: 5}, timeout: 100)

      {:ok, ref} = DSPyBridge.async(w, "sleep", %{seconds: 5}, timeout: 100)
      assert_receive {:dspy_bridge, ^ref, {:error, %Error{type: "timeout"}}}, 5000
      # the local backstop (timeout + 1 s) must not add a second one
      refute_receive {:dspy_bridge, ^ref, _}, 1500
    end

    test "the local backstop answers timeout when the worker cannot", %{w: w} do
      os_pid = Worker.info(w)["pid"]
      System.cmd("kill", ["-STOP", "#{os_pid}"])

      try do
        {:ok, ref} = DSPyBridge.async(w, "ping", %{}, timeout: 50)
        assert_receive {:dspy_bridge, ^ref, {:error, %Error{type: "timeout", message: msg}}}, 5000
        assert msg =~ "+1 s"
        System.cmd("kill", ["-CONT", "#{os_pid}"])
        assert {:ok, _} = DSPyBridge.call(w, "ping", %{})
        refute_received {:dspy_bridge, ^ref, _}
      after
        System.cmd("kill", ["-CONT", "#{os_pid}"])
      end
    end

    @tag :capture_log
    test "kill -9: in-flight callers get worker_exit 137; restarted, on_start runs again, next call works" do
      me = self()
      name = :"worker_#{System.unique_integer([:positive])}"
      on_start = fn w -> send(me, {:started, w, DSPyBridge.call(w, "ping", %{})}) end
      start_worker!(name: name, args: ["--diagnostics"], on_start: on_start)
      assert_received {:started, first, {:ok, _}}

      {:ok, ref} = DSPyBridge.async(name, "sleep", %{seconds: 30})
      stream_task = Task.async(fn -> DSPyBridge.call(name, "stream_count", %{n: 10_000_000}) end)
      await_stats(first, &(&1["in_flight"] == 2))
      System.cmd("kill", ["-9", "#{Worker.info(first)["pid"]}"])

      assert_receive {:dspy_bridge, ^ref,
                      {:error, %Error{type: "worker_exit", details: %{"exit_status" => 137}}}},
                     5000

      assert {:error, %Error{type: "worker_exit", details: %{"exit_status" => 137}}} =
               Task.await(stream_task)

      assert_receive {:started, second, {:ok, _}}, 10_000
      assert second != first and Process.whereis(name) == second
      assert {:ok, %{"pong" => true}} = DSPyBridge.call(name, "ping", %{})
    end

    test "stopping the worker closes the port: the Python process is gone within 200 ms", %{w: w} do
      os_pid = Worker.info(w)["pid"]
      assert os_alive?(os_pid)
      {:ok, ref} = DSPyBridge.async(w, "sleep", %{seconds: 30})
      GenServer.stop(w)
      assert_received {:dspy_bridge, ^ref, {:error, %Error{type: "worker_exit"}}}
      eventually(fn -> not os_alive?(os_pid) end, 20, 10)
    end
  end

  describe "host tools" do
    test "rpc_request answered by an Elixir function, concurrently, with $callers", %{w: w} do
      me = self()
      echo = fn [i], %{} -> send(me, {:callers, Process.get(:"$callers")}) && i end

      assert {:ok, %{"n" => 20}} =
               DSPyBridge.call(w, "rpc_loop", %{n: 20, concurrency: 4}, tools: %{"echo" => echo})

      assert_received {:callers, [^me | _]}
    end

    test "worker tools apply to every request; request tools override them" do
      w =
        start_worker!(
          args: ["--diagnostics"],
          tools: %{"echo" => fn [i], _ -> i end, "neg" => fn [i], _ -> -i end}
        )

      assert {:ok, _} = DSPyBridge.call(w, "rpc_loop", %{n: 3})
      # rpc_loop checks each answer: -1 for 1 fails the request
      assert {:error, %Error{traceback: tb}} =
               DSPyBridge.call(w, "rpc_loop", %{n: 3, tool: "neg"})

      assert tb =~ "tool 'neg' answered -1 to 1"

      assert {:ok, _} =
               DSPyBridge.call(w, "rpc_loop", %{n: 3, tool: "neg"},
                 tools: %{"neg" => fn [i], _ -> i end}
               )
    end
  end

  defp rss_bytes(w) do
    {:ok, %{"rss_bytes" => rss}} = DSPyBridge.call(w, "stats", %{})
    rss
  end
end
