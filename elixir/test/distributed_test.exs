defmodule DSPyBridge.DistributedTest do
  # not async: it turns this VM into a distributed node
  use ExUnit.Case, async: false

  import DSPyBridge.TestHelpers
  alias DSPyBridge.{DSPy, Error, Pool}

  @pool DSPyBridge.DistributedTest.Pool

  setup do
    {_, 0} = System.cmd("epmd", ["-daemon"])
    # epmd -daemon returns before epmd listens
    eventually(fn -> match?({_, 0}, System.cmd("epmd", ["-names"], stderr_to_stdout: true)) end)
    started_here = not Node.alive?()
    if started_here, do: {:ok, _} = Node.start(:"a@127.0.0.1", :longnames)
    paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])

    {:ok, peer, node} =
      :peer.start(%{
        name: :"b#{System.unique_integer([:positive])}",
        host: ~c"127.0.0.1",
        longnames: true,
        args: paths
      })

    on_exit(fn ->
      if Process.alive?(peer), do: :peer.stop(peer)
      if started_here, do: Node.stop()
    end)

    %{peer: peer, node: node}
  end

  @tag :capture_log
  test "a size-0 pool is served by another node's workers, with session affinity; a node down loses its sessions",
       %{peer: peer, node: node} do
    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:dspy_bridge])

    :ok =
      :erpc.call(node, DSPyBridge.TestHelpers, :start_unlinked_pool, [
        [name: @pool, size: 2, distributed: true]
      ])

    start_supervised!({Pool, name: @pool, size: 0, distributed: true})
    eventually(fn -> length(:pg.get_members(:dspy_bridge, {:pool, @pool})) == 2 end, 300)
    assert Pool.info(@pool).workers == []

    assert {:ok, %{"pong" => true}} = DSPyBridge.call(@pool, "ping", %{})

    for s <- ~w(x y) do
      script = List.duplicate(%{"answer" => "from #{s}"}, 5)
      {:ok, _} = DSPy.configure_lm(@pool, "scripted/#{s}", %{"script" => script}, session_id: s)
    end

    {:ok, %{node: ^node, pid: owner, os_pid: os_pid}} = Pool.whereis_session(@pool, "x")
    assert is_integer(os_pid)

    for _ <- 1..3, s <- ~w(x y) do
      assert {:ok, %{"answer" => "from " <> ^s}} =
               DSPy.predict(@pool, "q -> answer", %{q: "?"}, session_id: s)
    end

    assert {:ok, %{pid: ^owner}} = Pool.whereis_session(@pool, "x")
    # the peer routes the session to the same worker, through the {:session, id} group
    assert {:ok, %{pid: ^owner}} = :erpc.call(node, Pool, :whereis_session, [@pool, "x"])

    :peer.stop(peer)
    eventually(fn -> Pool.whereis_session(@pool, "x") == :error end)

    assert {:error, %Error{type: "session_lost"}} =
             DSPy.predict(@pool, "q -> answer", %{q: "?"}, session_id: "x")

    assert {:error, %Error{type: "overloaded"}} = DSPyBridge.call(@pool, "ping", %{})
  end
end
