defmodule DSPyBridge.Pool.Manager do
  @moduledoc """
  The process registered under a pool's name: it owns the pool's ETS table,
  assigns sessions to workers one at a time, and remembers lost sessions.

  The table (named after the pool, read by callers without a message) holds
  `{{:worker, pid}, load_atomics, os_pid, sessions}` for this node's workers,
  `{{:session, id}, pid, os_pid}` for the sessions this node routed (on any
  node's worker), and `{:draining, true}` once `DSPyBridge.Pool.drain/2` began.
  Sessions leave it when closed, unknown to their worker, or lost with their
  worker; lost ids go to a bounded LRU so that their next request gets
  `session_lost` once.
  """
  use GenServer
  require Logger

  alias DSPyBridge.{Error, Pool, Worker}

  @scope :dspy_bridge
  @lost_limit 10_000
  # commands that rebuild a lost session instead of reporting it
  @rebuild ["lm.configure", "session.create", "program.load"]

  @doc false
  def start_link({name, config}), do: GenServer.start_link(__MODULE__, {name, config}, name: name)

  @doc "A worker of this node joins the pool (from the worker's `init`)."
  @spec register(Pool.name(), pid, :atomics.atomics_ref(), integer) :: :ok
  def register(pool, pid, load, os_pid), do: GenServer.call(pool, {:register, pid, load, os_pid})

  @doc "This node's workers: `{pid, load_atomics, os_pid}`."
  @spec workers(Pool.name()) :: [{pid, :atomics.atomics_ref(), integer, non_neg_integer}]
  def workers(pool) do
    :ets.select(pool, [
      {{{:worker, :"$1"}, :"$2", :"$3", :"$4"}, [], [{{:"$1", :"$2", :"$3", :"$4"}}]}
    ])
  rescue
    ArgumentError -> []
  end

  @doc "The cached owner of a session: `{pid, os_pid}` or nil."
  @spec cached(Pool.name(), String.t()) :: {pid, integer} | nil
  def cached(pool, session_id) do
    case :ets.lookup(pool, {:session, session_id}) do
      [{_, pid, os_pid}] -> {pid, os_pid}
      [] -> nil
    end
  rescue
    ArgumentError -> nil
  end

  @doc "True once the pool is draining (or is not running)."
  @spec draining?(Pool.name()) :: boolean
  def draining?(pool) do
    :ets.member(pool, :draining)
  rescue
    ArgumentError -> true
  end

  @doc "The worker for a session, assigning it (or reporting it lost) when this node has no live owner cached."
  @spec assign(Pool.name(), String.t(), String.t()) :: {:ok, pid} | {:error, Error.t()}
  def assign(pool, session_id, command) do
    GenServer.call(pool, {:assign, session_id, command}, :infinity)
  catch
    :exit, reason -> {:error, Error.worker_exit(reason)}
  end

  @doc "A worker no longer holds the session (closed, or `unknown_session`)."
  @spec session_gone(Pool.name(), String.t(), pid) :: :ok
  def session_gone(pool, session_id, pid),
    do: GenServer.cast(pool, {:session_gone, session_id, pid})

  @doc "See `DSPyBridge.Pool.info/1`."
  @spec info(Pool.name()) :: map
  def info(pool), do: GenServer.call(pool, :info)

  @doc "See `DSPyBridge.Pool.drain/2`."
  @spec drain(Pool.name(), timeout) :: :ok
  def drain(pool, timeout), do: GenServer.call(pool, {:drain, timeout}, :infinity)

  # ---- the process ---------------------------------------------------------------

  @impl true
  def init({name, config}) do
    :ets.new(name, [:named_table, :public, read_concurrency: true])

    {:ok,
     %{name: name, config: config, monitored: %{}, lost: %{}, lru: :gb_trees.empty(), seq: 0}}
  end

  @impl true
  def handle_call({:register, pid, load, os_pid}, _from, st) do
    :ets.insert(st.name, {{:worker, pid}, load, os_pid, 0})
    if st.config.distributed, do: :pg.join(@scope, {:pool, st.name}, pid)
    {:reply, :ok, monitor(st, pid)}
  end

  def handle_call({:assign, id, command}, _from, st) do
    case cached(st.name, id) do
      {pid, _} ->
        if Pool.alive?(pid),
          do: {:reply, {:ok, pid}, st},
          else: new_owner(lose(st, pid), id, command)

      nil ->
        new_owner(st, id, command)
    end
  end

  def handle_call({:join, id, pid}, _from, st) do
    case :ets.lookup(st.name, {:worker, pid}) do
      [{_, _, os_pid, _}] ->
        :pg.join(@scope, {:session, id}, pid)
        put_session(st.name, id, pid, os_pid)
        {:reply, {:ok, os_pid}, st}

      [] ->
        {:reply, {:error, Error.worker_exit(:noproc)}, st}
    end
  end

  def handle_call(:info, _from, st) do
    workers =
      for {pid, load, os_pid, sessions} <- workers(st.name) do
        %{
          node: node(),
          pid: pid,
          os_pid: os_pid,
          in_flight: :atomics.get(load, 1),
          sessions: sessions
        }
      end

    info = %{
      workers: workers,
      in_flight: workers |> Enum.map(& &1.in_flight) |> Enum.sum(),
      sessions: workers |> Enum.map(& &1.sessions) |> Enum.sum()
    }

    {:reply, info, st}
  end

  def handle_call({:drain, timeout}, _from, st) do
    :ets.insert(st.name, {:draining, true})
    deadline = System.monotonic_time(:millisecond) + timeout
    await_idle(st.name, deadline)

    for {pid, _, os_pid, _} <- workers(st.name) do
      left = max(deadline - System.monotonic_time(:millisecond), 1000)

      case safe_call(fn -> Worker.shutdown(pid, left) end) do
        {:ok, 0} ->
          :ok

        other ->
          Logger.warning(
            "dspy_bridge: worker #{os_pid} of #{inspect(st.name)}: #{inspect(other)}"
          )
      end
    end

    {:reply, :ok, st}
  end

  @impl true
  def handle_cast({:session_gone, id, pid}, st) do
    with {^pid, _} <- cached(st.name, id), do: delete_session(st.name, id)
    if node(pid) == node(), do: :pg.leave(@scope, {:session, id}, pid)
    {:noreply, st}
  end

  @impl true
  def handle_info({:DOWN, _mon, :process, pid, _reason}, st) do
    :ets.delete(st.name, {:worker, pid})
    {:noreply, lose(%{st | monitored: Map.delete(st.monitored, pid)}, pid)}
  end

  # ---- sessions ------------------------------------------------------------------

  defp new_owner(st, id, command) do
    with [pid | _] <- :pg.get_members(@scope, {:session, id}),
         %{"pid" => os_pid} <- safe_call(fn -> Worker.info(pid) end) do
      {:reply, {:ok, pid}, cache(st, id, pid, os_pid)}
    else
      _ -> place(st, id, command)
    end
  end

  defp place(st, id, command) do
    {lost?, st} = unlose(st, id)

    cond do
      lost? and command not in @rebuild -> {:reply, {:error, session_lost(id)}, st}
      true -> place_on(st, id, Pool.pick(st.name, st.config))
    end
  end

  defp place_on(st, _id, {:error, _} = error), do: {:reply, error, st}

  defp place_on(st, id, {:ok, pid}) when node(pid) == node() do
    :pg.join(@scope, {:session, id}, pid)
    [{_, _, os_pid, _}] = :ets.lookup(st.name, {:worker, pid})
    {:reply, {:ok, pid}, cache(st, id, pid, os_pid)}
  end

  defp place_on(st, id, {:ok, pid}) do
    case safe_call(fn -> GenServer.call({st.name, node(pid)}, {:join, id, pid}) end) do
      {:ok, os_pid} -> {:reply, {:ok, pid}, cache(st, id, pid, os_pid)}
      {:error, error} -> {:reply, {:error, error}, st}
    end
  end

  # A call to another process (maybe on a node that just went down) must not take the manager down.
  defp safe_call(fun) do
    fun.()
  catch
    :exit, reason -> {:error, Error.worker_exit(reason)}
  end

  defp cache(st, id, pid, os_pid) do
    put_session(st.name, id, pid, os_pid)
    monitor(st, pid)
  end

  # Session rows, and the session count in the row of their worker when it is local.
  defp put_session(name, id, pid, os_pid) do
    delete_session(name, id)
    :ets.insert(name, {{:session, id}, pid, os_pid})
    count_session(name, pid, 1)
  end

  defp delete_session(name, id) do
    case :ets.take(name, {:session, id}) do
      [{_, pid, _}] -> count_session(name, pid, -1)
      [] -> :ok
    end
  end

  defp count_session(name, pid, n) do
    if :ets.member(name, {:worker, pid}), do: :ets.update_counter(name, {:worker, pid}, {4, n})
  end

  defp monitor(st, pid) do
    if Map.has_key?(st.monitored, pid),
      do: st,
      else: %{st | monitored: Map.put(st.monitored, pid, Process.monitor(pid))}
  end

  # The worker is gone: its sessions leave the cache and enter the lost LRU.
  defp lose(st, pid) do
    ids = :ets.select(st.name, [{{{:session, :"$1"}, pid, :_}, [], [:"$1"]}])
    :ets.match_delete(st.name, {{:session, :_}, pid, :_})
    Enum.reduce(ids, st, &remember_lost/2)
  end

  defp remember_lost(id, st) do
    {_, st} = unlose(st, id)
    seq = st.seq + 1
    st = %{st | seq: seq, lost: Map.put(st.lost, id, seq), lru: :gb_trees.insert(seq, id, st.lru)}

    if map_size(st.lost) > @lost_limit do
      {_, oldest, lru} = :gb_trees.take_smallest(st.lru)
      %{st | lost: Map.delete(st.lost, oldest), lru: lru}
    else
      st
    end
  end

  defp unlose(st, id) do
    case Map.pop(st.lost, id) do
      {nil, _} -> {false, st}
      {seq, lost} -> {true, %{st | lost: lost, lru: :gb_trees.delete(seq, st.lru)}}
    end
  end

  defp session_lost(id) do
    %Error{
      type: "session_lost",
      message:
        "session #{inspect(id)} lived in a worker that exited; configure its LM and load its programs " <>
          "again (lm.configure, program.load), or send the request again to use a fresh session",
      details: %{"session_id" => id}
    }
  end

  defp await_idle(name, deadline) do
    busy = Enum.any?(workers(name), fn {_, load, _, _} -> :atomics.get(load, 1) > 0 end)

    if busy and System.monotonic_time(:millisecond) < deadline do
      receive do
      after
        5 -> await_idle(name, deadline)
      end
    end
  end
end
