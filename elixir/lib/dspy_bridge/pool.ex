defmodule DSPyBridge.Pool do
  @moduledoc """
  N workers under one name, with session affinity, on one node or many.

      children = [
        {DSPyBridge.Pool,
         name: MyApp.DSPyPool,
         size: 4,
         worker: [python: "/srv/app/.venv/bin/python", on_start: &MyApp.DSPySetup.run/1]}
      ]

  `DSPyBridge.call/4`, `stream/4`, `async/4`, `cancel/2`, `credit/3` and every
  `DSPyBridge.DSPy` function take the pool's name wherever they take a worker.

  Routing:

    * without `session_id:`, a request goes to the local worker with the fewest
      requests in flight (and runs in that worker's default session: put what
      every default session needs in `on_start`);
    * with `session_id:`, it goes to the worker holding that session, assigned
      on first use to the least-loaded worker, local workers first. The owner
      joins the `:pg` group `{:session, id}` (scope `:dspy_bridge`), so every
      node routes the session the same way;
    * with `distributed: true` the workers join `{:pool, name}`, and a node whose
      own workers are missing (`size: 0`) or all at `max_in_flight` sends its
      requests to other nodes' workers. Only Erlang messages cross nodes, never frames.

  A worker that exits is restarted and runs `on_start` again; its callers in
  flight get `worker_exit`, and the next request in each of its sessions gets
  `session_lost` once (`lm.configure`, `session.create` and `program.load`
  reassign the session without it). Past `max_in_flight:` requests per worker
  (default `:infinity`) the caller gets `overloaded`, at once or after waiting
  at most `queue_timeout:` ms (default 0).
  """
  use Supervisor

  alias DSPyBridge.{Error, Worker}
  alias DSPyBridge.Pool.Manager

  @scope :dspy_bridge

  @typedoc "A pool's registered name."
  @type name :: atom

  @doc """
  Starts the pool: `name:` (required), `size:` (default `System.schedulers_online()`,
  0 allowed), `worker:` (the options of `DSPyBridge.Worker`), `max_in_flight:`,
  `queue_timeout:`, `distributed:`.
  """
  @spec start_link(keyword) :: Supervisor.on_start()
  def start_link(opts) do
    opts =
      Keyword.validate!(opts, [
        :name,
        :worker,
        :max_in_flight,
        :queue_timeout,
        :distributed,
        size: System.schedulers_online()
      ])

    name = Keyword.fetch!(opts, :name)

    config = %{
      max_in_flight: Keyword.get(opts, :max_in_flight, :infinity),
      queue_timeout: Keyword.get(opts, :queue_timeout, 0),
      distributed: Keyword.get(opts, :distributed, false)
    }

    # one entry per pool name, written again (unchanged) on a restart
    :persistent_term.put({__MODULE__, name}, config)
    Supervisor.start_link(__MODULE__, {opts, config}, name: Module.concat(name, Supervisor))
  end

  @doc false
  def child_spec(opts),
    do: %{
      id: Keyword.fetch!(opts, :name),
      start: {__MODULE__, :start_link, [opts]},
      type: :supervisor
    }

  @impl true
  def init({opts, config}) do
    name = opts[:name]

    worker =
      Keyword.merge(Keyword.get(opts, :worker, []),
        pool: name,
        max_in_flight: config.max_in_flight
      )

    workers =
      for i <- 1..opts[:size]//1 do
        %{id: {Worker, i}, start: {Worker, :start_link, [worker]}, restart: :transient}
      end

    children = [
      {Manager, {name, config}},
      %{
        id: :workers,
        type: :supervisor,
        start:
          {Supervisor, :start_link,
           [workers, [strategy: :one_for_one, max_restarts: 3 + 2 * opts[:size]]]}
      }
    ]

    Supervisor.init(children, strategy: :rest_for_one)
  end

  # ---- introspection and draining ------------------------------------------------

  @doc "Where a session lives: `{:ok, %{node:, pid:, os_pid:}}`, or `:error` when no worker holds it."
  @spec whereis_session(name, String.t()) :: {:ok, map} | :error
  def whereis_session(pool, session_id) do
    case Manager.cached(pool, session_id) || members(session_id) do
      nil -> :error
      {pid, os_pid} -> {:ok, %{node: node(pid), pid: pid, os_pid: os_pid}}
    end
  end

  defp members(session_id) do
    case :pg.get_members(@scope, {:session, session_id}) do
      [pid | _] -> {pid, Worker.info(pid)["pid"]}
      [] -> nil
    end
  end

  @doc """
  This node's workers: `%{workers: [%{node, pid, os_pid, in_flight, sessions}], in_flight: n, sessions: n}`.
  """
  @spec info(name) :: map
  def info(pool), do: Manager.info(pool)

  @doc """
  Stops routing to the pool (new requests get `overloaded`), waits up to
  `timeout` ms for the requests in flight, then sends each worker `shutdown`
  so that the Python processes exit 0. For application shutdown.
  """
  @spec drain(name, timeout) :: :ok
  def drain(pool, timeout \\ 30_000), do: Manager.drain(pool, timeout)

  # ---- routing (runs in the caller) ----------------------------------------------

  @doc false
  # The pool's config when `target` names a pool, else nil.
  @spec lookup(term) :: map | nil
  def lookup(target) when is_atom(target), do: :persistent_term.get({__MODULE__, target}, nil)
  def lookup(_target), do: nil

  @doc false
  # Routes one request and sends it with `send_fun.(worker_pid)`, retrying on
  # `overloaded` until `queue_timeout` has passed.
  @spec request(name, map, String.t() | nil, String.t(), (pid -> result)) :: result
        when result: term
  def request(pool, config, session_id, command, send_fun) do
    deadline = System.monotonic_time(:millisecond) + config.queue_timeout
    attempt(pool, config, session_id, command, send_fun, deadline)
  end

  defp attempt(pool, config, session_id, command, send_fun, deadline) do
    result =
      case route(pool, config, session_id, command) do
        {:ok, pid} -> send_fun.(pid)
        error -> error
      end

    case result do
      {:error, %Error{type: "overloaded"}} = overloaded ->
        if System.monotonic_time(:millisecond) < deadline do
          receive do
          after
            2 -> attempt(pool, config, session_id, command, send_fun, deadline)
          end
        else
          overloaded
        end

      other ->
        other
    end
  end

  defp route(pool, config, session_id, command) do
    cond do
      Manager.draining?(pool) -> {:error, overloaded(config.max_in_flight)}
      session_id == nil -> pick(pool, config)
      true -> session(pool, session_id, command)
    end
  end

  defp session(pool, session_id, command) do
    case Manager.cached(pool, session_id) do
      {pid, _} -> if alive?(pid), do: {:ok, pid}, else: Manager.assign(pool, session_id, command)
      nil -> Manager.assign(pool, session_id, command)
    end
  end

  @doc false
  # The local worker under the limit with the fewest requests in flight, then the
  # fewest sessions (ties at random); else (distributed) a random remote one.
  @spec pick(name, map) :: {:ok, pid} | {:error, Error.t()}
  def pick(pool, config) do
    loads =
      for {pid, load, _, sessions} <- Manager.workers(pool),
          n <- [:atomics.get(load, 1)],
          n < config.max_in_flight,
          do: {{n, sessions}, pid}

    case loads do
      [] -> remote(pool, config)
      loads -> {:ok, least(loads)}
    end
  end

  defp least(loads) do
    {min, _} = Enum.min_by(loads, &elem(&1, 0))
    loads |> Enum.filter(&(elem(&1, 0) == min)) |> Enum.random() |> elem(1)
  end

  defp remote(pool, %{distributed: true} = config) do
    case :pg.get_members(@scope, {:pool, pool}) -- :pg.get_local_members(@scope, {:pool, pool}) do
      [] -> {:error, overloaded(config.max_in_flight)}
      pids -> {:ok, Enum.random(pids)}
    end
  end

  defp remote(_pool, config), do: {:error, overloaded(config.max_in_flight)}

  @doc false
  @spec alive?(pid) :: boolean
  def alive?(pid) when node(pid) == node(), do: Process.alive?(pid)
  def alive?(pid), do: node(pid) in Node.list()

  @doc false
  # Every worker a request of this pool may be on (for cancel and credit by ref).
  @spec all_workers(name, map) :: [pid]
  def all_workers(pool, %{distributed: true}),
    do: Enum.uniq(local_pids(pool) ++ :pg.get_members(@scope, {:pool, pool}))

  def all_workers(pool, _config), do: local_pids(pool)

  defp local_pids(pool), do: for({pid, _, _, _} <- Manager.workers(pool), do: pid)

  @doc false
  @spec overloaded(non_neg_integer | :infinity) :: Error.t()
  def overloaded(limit) do
    %Error{
      type: "overloaded",
      message:
        "every worker has max_in_flight (#{inspect(limit)}) requests in flight, or the pool is draining",
      details: %{"limit" => limit}
    }
  end
end
