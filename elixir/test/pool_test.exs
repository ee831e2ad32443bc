defmodule DSPyBridge.PoolTest do
  # not async: each test runs several Python workers on a 2-core machine
  use ExUnit.Case, async: false

  import DSPyBridge.TestHelpers
  import ExUnit.CaptureLog
  alias DSPyBridge.{DSPy, Error, Pool}

  defp start_pool!(opts) do
    name = :"pool_#{System.unique_integer([:positive])}"
    start_supervised!({Pool, [name: name] ++ opts})
    name
  end

  defp pids(pool), do: Enum.map(Pool.info(pool).workers, & &1.pid)

  test "4 workers, 2,000 concurrent echo calls from 200 processes: all answered, the load spread" do
    pool = start_pool!(size: 4)

    1..200
    |> Enum.map(fn p ->
      Task.async(fn ->
        for i <- 1..10,
            do:
              assert(
                {:ok, %{"p" => ^p, "i" => ^i}} = DSPyBridge.call(pool, "echo", %{p: p, i: i})
              )
      end)
    end)
    |> Task.await_many(60_000)

    counts =
      for pid <- pids(pool) do
        {:ok, stats} = DSPyBridge.call(pid, "stats", %{})
        stats["requests"]["echo"] || 0
      end

    assert length(counts) == 4 and Enum.sum(counts) == 2000

    assert Enum.all?(counts, &(&1 <= 1000)),
           "more than twice a worker's share: #{inspect(counts)}"
  end

  test "50 sessions with their own scripted LMs, used 20 times interleaved: each answer from its own script" do
    pool = start_pool!(size: 2)
    sessions = for i <- 1..50, do: "s#{i}"

    for s <- sessions do
      script = List.duplicate(%{"answer" => "from #{s}"}, 20)

      assert {:ok, _} =
               DSPy.configure_lm(pool, "scripted/#{s}", %{"script" => script}, session_id: s)
    end

    owners = Map.new(sessions, &{&1, Pool.whereis_session(pool, &1)})

    assert owners |> Map.values() |> Enum.map(fn {:ok, o} -> o.pid end) |> Enum.uniq() |> length() ==
             2

    for _round <- 1..20 do
      sessions
      |> Task.async_stream(
        &{&1, DSPy.predict(pool, "question -> answer", %{question: "?"}, session_id: &1)},
        max_concurrency: 10
      )
      |> Enum.each(fn {:ok, {s, answer}} -> assert answer == {:ok, %{"answer" => "from #{s}"}} end)
    end

    assert Map.new(sessions, &{&1, Pool.whereis_session(pool, &1)}) == owners
    # new sessions go to the worker with the fewest requests in flight, then the fewest sessions
    assert Enum.map(Pool.info(pool).workers, & &1.sessions) == [25, 25]
    # a closed session leaves the cache
    :ok = DSPy.close_session(pool, "s1")
    eventually(fn -> Pool.whereis_session(pool, "s1") == :error end)
  end

  @tag :capture_log
  test "kill -9 of one worker mid-load: its callers get worker_exit, its sessions session_lost once, the pool refills" do
    me = self()

    pool =
      start_pool!(size: 2, worker: [args: ["--diagnostics"], on_start: &send(me, {:started, &1})])

    assert_receive {:started, _}
    assert_receive {:started, _}
    script = List.duplicate(%{"answer" => "ok"}, 10)

    for s <- ~w(a b c d),
        do: {:ok, _} = DSPy.configure_lm(pool, "scripted/m", %{"script" => script}, session_id: s)

    owner = fn s -> elem(Pool.whereis_session(pool, s), 1) end
    victim = owner.("a")
    {doomed, spared} = Enum.split_with(~w(a b c d), &(owner.(&1).pid == victim.pid))

    {:ok, on_victim} = DSPyBridge.async(pool, "sleep", %{seconds: 30}, session_id: hd(doomed))

    survivor =
      Task.async(fn ->
        DSPyBridge.stream(pool, "stream_count", %{n: 20_000}, session_id: hd(spared))
        |> Enum.count()
      end)

    await_stats(victim.pid, &(&1["in_flight"] == 1))
    System.cmd("kill", ["-9", "#{victim.os_pid}"])

    assert_receive {:dspy_bridge, ^on_victim,
                    {:error, %Error{type: "worker_exit", details: %{"exit_status" => 137}}}},
                   5000

    assert Task.await(survivor, 30_000) == 20_001
    eventually(fn -> Pool.whereis_session(pool, hd(doomed)) == :error end)

    # two sessions per worker: ties in load go to the worker with fewer sessions
    assert [first, second] = doomed

    assert {:error, %Error{type: "session_lost"}} =
             DSPy.predict(pool, "q -> answer", %{q: "?"}, session_id: first)

    # once: the rebuild (configure the LM again) then works; lm.configure alone rebuilds without the error
    for s <- [first, second] do
      assert {:ok, _} =
               DSPy.configure_lm(pool, "scripted/m", %{"script" => script}, session_id: s)

      assert {:ok, %{"answer" => "ok"}} =
               DSPy.predict(pool, "q -> answer", %{q: "?"}, session_id: s)
    end

    for s <- spared,
        do:
          assert(
            {:ok, %{"answer" => "ok"}} =
              DSPy.predict(pool, "q -> answer", %{q: "?"}, session_id: s)
          )

    assert_receive {:started, _}, 10_000
    eventually(fn -> length(pids(pool)) == 2 and victim.pid not in pids(pool) end)
  end

  test "credit and cancel by ref through the pool's name" do
    pool = start_pool!(size: 2, worker: [args: ["--diagnostics"]])
    {:ok, ref} = DSPyBridge.async(pool, "stream_count", %{n: 4}, window: 2)
    for i <- 0..1, do: assert_receive({:dspy_bridge, ^ref, {:chunk, ^i}}, 5000)
    refute_receive {:dspy_bridge, ^ref, _}, 100
    :ok = DSPyBridge.credit(pool, ref, 2)
    for i <- 2..3, do: assert_receive({:dspy_bridge, ^ref, {:chunk, ^i}}, 5000)
    assert_receive {:dspy_bridge, ^ref, {:result, nil}}, 5000

    {:ok, ref} = DSPyBridge.async(pool, "sleep", %{seconds: 30})
    :ok = DSPyBridge.cancel(pool, ref)
    assert_receive {:dspy_bridge, ^ref, {:error, %Error{type: "cancelled"}}}, 5000
  end

  test "max_in_flight: 10 and 100 callers: the excess gets overloaded at once, nothing hangs" do
    pool = start_pool!(size: 1, max_in_flight: 10, worker: [args: ["--diagnostics"]])

    results =
      1..100
      |> Enum.map(fn _ ->
        Task.async(fn ->
          {DSPyBridge.call(pool, "sleep", %{seconds: 1}), System.monotonic_time()}
        end)
      end)
      |> Task.await_many(30_000)

    {ok, refused} = Enum.split_with(results, &match?({{:ok, _}, _}, &1))
    assert length(ok) == 10 and length(refused) == 90
    assert Enum.all?(refused, &match?({{:error, %Error{type: "overloaded"}}, _}, &1))
    # "at once": every refusal came before the first sleep ended
    assert Enum.max(for {_, t} <- refused, do: t) < Enum.min(for {_, t} <- ok, do: t)
  end

  test "queue_timeout: the excess waits at most that long, then gets overloaded" do
    pool =
      start_pool!(
        size: 1,
        max_in_flight: 2,
        queue_timeout: 200,
        worker: [args: ["--diagnostics"]]
      )

    sleepers =
      for _ <- 1..2, do: Task.async(fn -> DSPyBridge.call(pool, "sleep", %{seconds: 3}) end)

    eventually(fn -> Pool.info(pool).in_flight == 2 end)
    started = System.monotonic_time(:millisecond)
    assert {:error, %Error{type: "overloaded"}} = DSPyBridge.call(pool, "ping", %{})
    waited = System.monotonic_time(:millisecond) - started
    assert waited >= 200 and waited < 2500
    assert [{:ok, _}, {:ok, _}] = Task.await_many(sleepers, 10_000)
  end

  test "drain: in-flight requests finish, new calls get overloaded, the Python processes exit 0" do
    pool = start_pool!(size: 2, worker: [args: ["--diagnostics"]])
    os_pids = Enum.map(Pool.info(pool).workers, & &1.os_pid)

    stream =
      Task.async(fn -> DSPyBridge.stream(pool, "stream_count", %{n: 5000}) |> Enum.count() end)

    {:ok, sleeping} = DSPyBridge.async(pool, "sleep", %{seconds: 0.5})
    eventually(fn -> Pool.info(pool).in_flight == 2 end)
    me = self()

    drain =
      Task.async(fn -> capture_log(fn -> send(me, {:drained, Pool.drain(pool, 10_000)}) end) end)

    eventually(fn ->
      match?({:error, %Error{type: "overloaded"}}, DSPyBridge.call(pool, "ping", %{}))
    end)

    assert Task.await(stream, 10_000) == 5001
    assert_receive {:dspy_bridge, ^sleeping, {:result, _}}, 10_000
    assert_receive {:drained, :ok}, 15_000
    assert Task.await(drain) == "", "a worker did not exit 0"
    eventually(fn -> not Enum.any?(os_pids, &os_alive?/1) end)
    assert Pool.info(pool).workers == []
  end
end
