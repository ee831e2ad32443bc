defmodule DSPyBridge.TestHelpers do
  @moduledoc "Starting real workers in tests and waiting on them without sleeps."
  import ExUnit.Callbacks, only: [start_supervised!: 2]
  import ExUnit.Assertions

  @doc "Starts a worker under the test's supervisor; `opts` are worker options."
  def start_worker!(opts \\ []) do
    id = System.unique_integer([:positive])
    start_supervised!({DSPyBridge.Worker, opts}, id: {:worker, id})
  end

  @doc "No request is registered in the `DSPyBridge.Worker` process `w` (ids, refs, monitors)."
  def nothing_registered?(w) do
    %{reqs: reqs, refs: refs, mons: mons} = :sys.get_state(w)
    {reqs, refs, mons} == {%{}, %{}, %{}}
  end

  @doc "Polls the worker's `stats` until `check` holds for them (bounded by `eventually/3`)."
  def await_stats(w, check) do
    eventually(fn ->
      {:ok, stats} = DSPyBridge.call(w, "stats", %{})
      check.(stats)
    end)
  end

  @doc "True while the OS process `pid` exists."
  def os_alive?(pid),
    do: match?({_, 0}, System.cmd("kill", ["-0", "#{pid}"], stderr_to_stdout: true))

  @doc "Polls `fun` until it returns true, at most `tries` times `every` ms apart."
  def eventually(fun, tries \\ 100, every \\ 10) do
    cond do
      fun.() ->
        :ok

      tries == 0 ->
        flunk("condition never held")

      true ->
        receive do
        after
          every -> eventually(fun, tries - 1, every)
        end
    end
  end

  @doc "Starts a pool not linked to the calling process (for :erpc calls onto a peer node)."
  def start_unlinked_pool(opts) do
    {:ok, pid} = DSPyBridge.Pool.start_link(opts)
    Process.unlink(pid)
    :ok
  end
end
