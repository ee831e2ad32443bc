defmodule DSPyBridge.Worker do
  @moduledoc """
  A GenServer that owns one Python worker (`python -m bridge serve`) through an Erlang Port.

  It routes the worker's frames to the processes that made the requests, runs
  host tools in tasks, monitors callers (a caller that dies has its requests
  cancelled), and turns the worker's exit into a `worker_exit` error for every
  pending caller before it stops itself. Restarting is the supervisor's job:

      children = [
        {DSPyBridge.Worker,
         name: MyApp.DSPy,
         python: "/srv/app/.venv/bin/python",
         on_start: &MyApp.DSPySetup.configure/1}
      ]

  Use `DSPyBridge.call/4`, `DSPyBridge.stream/4` and `DSPyBridge.async/4` to
  talk to it; this module starts it, answers `info/1` and stops it with `shutdown/2`.
  """
  use GenServer
  require Logger

  alias DSPyBridge.{Error, Tools}

  @typedoc "A worker: its pid or any GenServer name."
  @type server :: GenServer.server()

  @typedoc "Options of `start_link/1` and `start/1` (see `docs/elixir.md`)."
  @type option ::
          {:python, String.t()}
          | {:args, [String.t()]}
          | {:env, [{String.t(), String.t()}]}
          | {:cd, String.t()}
          | {:use_stdio, boolean}
          | {:tools, %{String.t() => Tools.tool()}}
          | {:on_start, (pid -> term) | nil}
          | {:telemetry_handler, (list, map, map -> term) | nil}
          | {:codec, module}
          | {:start_timeout, timeout}
          | {:name, GenServer.name()}

  @start_options [
    :python,
    :args,
    :env,
    :cd,
    :use_stdio,
    :tools,
    :on_start,
    :telemetry_handler,
    :codec,
    :start_timeout,
    :name,
    :id,
    # set by DSPyBridge.Pool for its workers
    :pool,
    :max_in_flight
  ]

  defstruct [
    :port,
    :codec,
    :info,
    :tools,
    :emit,
    :pool,
    :load,
    max_in_flight: :infinity,
    reqs: %{},
    refs: %{},
    mons: %{},
    rpcs: %{},
    tasks: %{}
  ]

  # ---- starting ------------------------------------------------------------------

  @doc """
  Starts a worker linked to the caller and returns once its `ready` frame arrived
  and `on_start` (if any) returned.

  Failures are `{:error, {:worker_start, reason, hint}}` (`reason`: the exit
  status, `:enoent`, `:eacces` or `:timeout`; `hint`: what to install or
  configure) or `{:error, {:on_start, reason}}` when `on_start` returned
  `{:error, reason}`.
  """
  @spec start_link([option]) :: GenServer.on_start()
  def start_link(opts \\ []), do: start(:start_link, opts)

  @doc "Like `start_link/1`, without a link: a start failure cannot take the caller down."
  @spec start([option]) :: GenServer.on_start()
  def start(opts \\ []), do: start(:start, opts)

  @doc false
  def child_spec(opts) do
    %{id: Keyword.get(opts, :id, __MODULE__), start: {__MODULE__, :start_link, [opts]}}
  end

  @doc """
  Sends the worker `shutdown`, waits up to `timeout` ms for the Python process
  to exit, and stops with reason `:normal` (a `:transient` child stays down).
  Returns the exit status, or `:timeout` (the port is then closed).
  """
  @spec shutdown(server, timeout) :: {:ok, non_neg_integer | :timeout}
  def shutdown(worker, timeout \\ 30_000),
    do: GenServer.call(worker, {:shutdown, timeout}, :infinity)

  @doc "The worker's `ready` frame: `\"version\"`, `\"pid\"` (the OS pid), `\"commands\"`, `\"capabilities\"`."
  @spec info(server) :: map
  def info(worker), do: GenServer.call(worker, :info)

  @doc false
  # Writes a frame from outside the worker's process (a caller, a tool's task). A closed port
  # is no error: the worker is going down and answers for what it registered. Anything else
  # an open port refuses raises, as `Port.command/2` does.
  @spec command(port, iodata) :: :ok
  def command(port, iodata) do
    Port.command(port, iodata)
    :ok
  catch
    :error, :badarg ->
      if Port.info(port) != nil, do: :erlang.raise(:error, :badarg, __STACKTRACE__)
      :ok
  end

  @doc false
  # Drops a request registered by a caller that then failed to encode it.
  @spec forget(pid, reference) :: :ok
  def forget(worker, ref) do
    GenServer.call(worker, {:forget, ref}, :infinity)
  catch
    :exit, _ -> :ok
  end

  defp start(fun, opts) do
    opts = Keyword.validate!(opts, @start_options)
    gen_opts = Keyword.take(opts, [:name])

    with {:ok, pid} <- apply(GenServer, fun, [__MODULE__, opts, gen_opts]) do
      run_on_start(pid, opts[:on_start])
    end
  end

  defp run_on_start(pid, nil), do: {:ok, pid}

  defp run_on_start(pid, on_start) do
    case on_start.(pid) do
      {:error, reason} ->
        GenServer.stop(pid)
        {:error, {:on_start, reason}}

      _ ->
        {:ok, pid}
    end
  rescue
    e ->
      GenServer.stop(pid)
      reraise e, __STACKTRACE__
  end

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    codec = Keyword.get(opts, :codec, DSPyBridge.Msgpack)

    case DSPyBridge.Launch.open(opts, codec) do
      {:ok, port, ready} ->
        st = %__MODULE__{
          port: port,
          codec: codec,
          info: Map.delete(ready, "type"),
          tools: Keyword.get(opts, :tools, %{}),
          emit: emitter(opts[:telemetry_handler]),
          max_in_flight: Keyword.get(opts, :max_in_flight, :infinity)
        }

        {:ok, join_pool(st, opts[:pool])}

      {:error, reason} ->
        {:stop, reason}
    end
  end

  # A pool's worker publishes its requests in flight in an atomics the pool reads to route.
  defp join_pool(st, nil), do: st

  defp join_pool(st, pool) do
    load = :atomics.new(1, signed: false)
    :ok = DSPyBridge.Pool.Manager.register(pool, self(), load, st.info["pid"])
    %{st | pool: pool, load: load}
  end

  defp emitter(handler) do
    if Code.ensure_loaded?(:telemetry), do: :telemetry, else: handler
  end

  # ---- requests from callers -----------------------------------------------------

  @impl true
  def handle_call(:info, _from, st), do: {:reply, st.info, st}

  def handle_call(request, _from, %{reqs: reqs, max_in_flight: max} = st)
      when elem(request, 0) == :request and map_size(reqs) >= max do
    {:reply, {:error, DSPyBridge.Pool.overloaded(max)}, st}
  end

  # A local caller encodes and writes its request itself: it gets the port and the codec.
  def handle_call({:request, ref, id, req}, {caller, _}, st) do
    st = register(st, ref, id, req, caller)
    {:reply, {:ok, self(), st.port, st.codec}, st}
  end

  # A caller on another node: frames never cross nodes, so the request is encoded and written here.
  def handle_call({:request, ref, id, req, frame}, {caller, _}, st) do
    case encode(st.codec, frame) do
      {:ok, iodata} ->
        {:reply, {:ok, self()}, st |> write(iodata) |> register(ref, id, req, caller)}

      {:error, exception} ->
        {:reply, {:raise, exception}, st}
    end
  end

  def handle_call({:shutdown, timeout}, _from, st) do
    st = send_frame(st, %{"type" => "shutdown"})
    port = st.port

    status =
      receive do
        {^port, {:exit_status, status}} -> status
      after
        timeout ->
          Port.close(port)
          :timeout
      end

    st = fail_all(%{st | port: nil}, Error.worker_exit(status))
    {:stop, :normal, {:ok, status}, st}
  end

  def handle_call({:abandon, ref}, _from, st) do
    case st.refs do
      %{^ref => id} ->
        {:reply, :ok, st |> send_frame(%{"type" => "cancel", "id" => id}) |> finish(id)}

      _ ->
        {:reply, :ok, st}
    end
  end

  # A request registered but never written (its caller's codec refused it): no cancel to send.
  def handle_call({:forget, ref}, _from, st) do
    case st.refs do
      %{^ref => id} -> {:reply, :ok, finish(st, id)}
      _ -> {:reply, :ok, st}
    end
  end

  defp register(st, ref, id, req, caller) do
    mon = Process.monitor(caller)
    timer = req.timeout && Process.send_after(self(), {:backstop, id}, req.timeout + 1000)
    req = Map.merge(req, %{ref: ref, caller: caller, mon: mon, timer: timer})

    st = %{
      st
      | reqs: Map.put(st.reqs, id, req),
        refs: Map.put(st.refs, ref, id),
        mons: Map.put(st.mons, mon, id)
    }

    publish_load(st)
  end

  @impl true
  def handle_cast({:cancel, ref}, st),
    do: {:noreply, to_request(st, ref, &%{"type" => "cancel", "id" => &1})}

  def handle_cast({:credit, ref, n}, st),
    do: {:noreply, to_request(st, ref, &%{"type" => "credit", "id" => &1, "n" => n})}

  defp to_request(st, ref, frame) do
    case st.refs do
      %{^ref => id} -> send_frame(st, frame.(id))
      _ -> st
    end
  end

  # ---- frames from the worker ----------------------------------------------------

  @impl true
  def handle_info({port, {:data, data}}, %{port: port} = st) do
    case decode(st.codec, data) do
      {:ok, decoded} -> {:noreply, frame(decoded, st)}
      :error -> {:noreply, st}
    end
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = st) do
    st = fail_all(%{st | port: nil}, Error.worker_exit(status))
    {:stop, if(status == 0, do: :normal, else: {:worker_exit, status}), st}
  end

  def handle_info({:EXIT, port, reason}, %{port: port} = st) do
    {:stop, {:worker_exit, reason}, fail_all(%{st | port: nil}, Error.worker_exit(reason))}
  end

  def handle_info({:DOWN, mon, :process, _pid, reason}, st) do
    cond do
      Map.has_key?(st.mons, mon) -> {:noreply, caller_down(st, st.mons[mon])}
      Map.has_key?(st.tasks, mon) -> {:noreply, task_down(st, mon, reason)}
      true -> {:noreply, st}
    end
  end

  def handle_info({:backstop, id}, st) do
    case st.reqs do
      %{^id => req} ->
        error = %Error{
          type: "timeout",
          message: "no answer within #{req.timeout} ms (+1 s)",
          details: %{"timeout_ms" => req.timeout}
        }

        st = send_frame(st, %{"type" => "cancel", "id" => id})
        {:noreply, terminal(st, id, {:error, error}, %{})}

      _ ->
        {:noreply, st}
    end
  end

  def handle_info({:rpc_timeout, rpc_id}, st), do: {:noreply, drop_rpc(st, rpc_id)}

  # A tool's task wrote its answer (`spawn_tool`).
  def handle_info({task_ref, :answered}, st) when is_reference(task_ref) do
    case Map.pop(st.tasks, task_ref) do
      {nil, _} ->
        {:noreply, st}

      {rpc_id, tasks} ->
        Process.demonitor(task_ref, [:flush])
        {%{timer: timer}, rpcs} = Map.pop(st.rpcs, rpc_id)
        cancel_timer(timer)
        {:noreply, %{st | tasks: tasks, rpcs: rpcs}}
    end
  end

  def handle_info(_other, st), do: {:noreply, st}

  defp frame(%{"type" => "chunk", "id" => id, "data" => data}, st) do
    with %{^id => req} <- st.reqs, do: send(req.caller, {:dspy_bridge, req.ref, {:chunk, data}})
    st
  end

  defp frame(%{"type" => "result", "id" => id} = f, st),
    do: terminal(st, id, {:result, f["data"]}, f["meta"])

  defp frame(%{"type" => "error", "id" => id} = f, st) when id != nil,
    do: terminal(st, id, {:error, Error.from_frame(f["error"] || %{})}, f["meta"])

  defp frame(%{"type" => "telemetry", "id" => id, "event" => event} = f, st)
       when event not in ["stop", "exception"] do
    with %{^id => req} <- st.reqs do
      emit(st, event, f["measurements"], metadata(req, id, f["metadata"]))
    end

    st
  end

  defp frame(%{"type" => "rpc_request"} = f, st), do: start_rpc(st, f)
  defp frame(%{"type" => "rpc_cancel", "rpc_id" => rpc_id}, st), do: drop_rpc(st, rpc_id)

  defp frame(%{"type" => "error"} = f, st) do
    Logger.warning("dspy_bridge: the worker reported #{inspect(f["error"])}")
    st
  end

  defp frame(_other, st), do: st

  # Delivers a request's one terminal message, emits :stop/:exception, and forgets it.
  defp terminal(st, id, outcome, meta) do
    case st.reqs do
      %{^id => req} ->
        {event, extra} =
          case outcome do
            {:result, _} -> {"stop", %{}}
            {:error, e} -> {"exception", %{"error_type" => e.type}}
          end

        if st.emit, do: emit(st, event, meta || %{}, metadata(req, id, extra))
        send(req.caller, {:dspy_bridge, req.ref, outcome})
        session_outcome(st, req, outcome)
        finish(st, id)

      _ ->
        st
    end
  end

  defp finish(st, id) do
    {req, reqs} = Map.pop(st.reqs, id)
    Process.demonitor(req.mon, [:flush])
    cancel_timer(req.timer)

    publish_load(%{
      st
      | reqs: reqs,
        refs: Map.delete(st.refs, req.ref),
        mons: Map.delete(st.mons, req.mon)
    })
  end

  defp publish_load(%{load: nil} = st), do: st

  defp publish_load(st) do
    :atomics.put(st.load, 1, map_size(st.reqs))
    st
  end

  # A pool forgets a session this worker no longer holds: closed, or unknown to the worker.
  defp session_outcome(%{pool: nil}, _req, _outcome), do: :ok
  defp session_outcome(_st, %{session_id: nil}, _outcome), do: :ok

  defp session_outcome(st, %{session_id: sid, command: command}, outcome) do
    case outcome do
      {:result, _} when command == "session.close" ->
        DSPyBridge.Pool.Manager.session_gone(st.pool, sid, self())

      {:error, %Error{type: "unknown_session"}} ->
        DSPyBridge.Pool.Manager.session_gone(st.pool, sid, self())

      _ ->
        :ok
    end
  end

  defp caller_down(st, id), do: st |> send_frame(%{"type" => "cancel", "id" => id}) |> finish(id)

  defp fail_all(st, error) do
    st = Enum.reduce(Map.keys(st.rpcs), st, &drop_rpc(&2, &1))
    Enum.reduce(Map.keys(st.reqs), st, &terminal(&2, &1, {:error, error}, nil))
  end

  # ---- host tools ----------------------------------------------------------------

  defp start_rpc(st, %{"rpc_id" => rpc_id, "tool" => name} = f) do
    req = Map.get(st.reqs, f["id"], %{tools: %{}, caller: nil})
    tools = Map.merge(st.tools, req.tools)

    case tools do
      %{^name => fun} ->
        task = spawn_tool(fun, f, req.caller, st)

        timer =
          f["timeout_ms"] && Process.send_after(self(), {:rpc_timeout, rpc_id}, f["timeout_ms"])

        %{
          st
          | rpcs: Map.put(st.rpcs, rpc_id, %{task: task, timer: timer}),
            tasks: Map.put(st.tasks, task.ref, rpc_id)
        }

      _ ->
        write(st, Tools.response(rpc_id, Tools.unknown(name, Map.keys(tools)), st.codec))
    end
  end

  # The task writes its answer to the port itself: the worker's process only keeps the books.
  defp spawn_tool(fun, f, caller, %{codec: codec, port: port}) do
    Task.Supervisor.async_nolink(DSPyBridge.TaskSupervisor, fn ->
      if caller, do: Process.put(:"$callers", [caller | Process.get(:"$callers", [])])
      outcome = Tools.run(fun, f["args"] || [], f["kwargs"] || %{})
      answer(port, Tools.response(f["rpc_id"], outcome, codec))
    end)
  end

  # A codec's result no port takes fails the task, and `task_down/3` answers for it.
  defp answer(port, iodata) do
    command(port, iodata)
    :answered
  end

  # The worker gave up on the call (rpc_cancel, or its timeout_ms passed): kill the task.
  defp drop_rpc(st, rpc_id) do
    case Map.pop(st.rpcs, rpc_id) do
      {nil, _} ->
        st

      {%{task: task, timer: timer}, rpcs} ->
        Process.demonitor(task.ref, [:flush])
        Process.exit(task.pid, :kill)
        cancel_timer(timer)
        %{st | rpcs: rpcs, tasks: Map.delete(st.tasks, task.ref)}
    end
  end

  # Tools.run catches everything, so only an outside kill ends a task without a reply.
  defp task_down(st, ref, reason) do
    {rpc_id, tasks} = Map.pop(st.tasks, ref)
    {%{timer: timer}, rpcs} = Map.pop(st.rpcs, rpc_id)
    cancel_timer(timer)
    outcome = {:error, "exception", "exit: #{inspect(reason)}"}
    write(%{st | tasks: tasks, rpcs: rpcs}, Tools.response(rpc_id, outcome, st.codec))
  end

  # ---- telemetry -----------------------------------------------------------------

  defp metadata(req, id, extra) do
    Map.merge(atomize(extra), %{
      request_id: id,
      command: req.command,
      session_id: req.session_id,
      worker: self()
    })
  end

  defp emit(%{emit: nil}, _, _, _), do: :ok

  defp emit(%{emit: emit}, event, measurements, metadata) do
    name = [:dspy_bridge, :request, String.to_atom(event)]

    case emit do
      :telemetry -> apply(:telemetry, :execute, [name, atomize(measurements), metadata])
      fun -> fun.(name, atomize(measurements), metadata)
    end
  rescue
    e -> Logger.error("dspy_bridge: telemetry handler failed: #{Exception.message(e)}")
  end

  # The worker sends a fixed set of event, measurement and metadata names.
  defp atomize(map) when is_map(map), do: Map.new(map, fn {k, v} -> {String.to_atom(k), v} end)
  defp atomize(nil), do: %{}

  # ---- the port ------------------------------------------------------------------

  defp send_frame(st, frame), do: write(st, st.codec.pack!(frame))

  # The codec raises what it likes (ArgumentError here, Msgpax.PackError for Msgpax).
  defp encode(codec, term) do
    {:ok, codec.pack!(term)}
  rescue
    e -> {:error, e}
  end

  defp decode(codec, data) do
    {:ok, codec.unpack!(data)}
  rescue
    e ->
      Logger.error("dspy_bridge: undecodable frame from the worker: #{Exception.message(e)}")
      :error
  end

  defp write(%{port: nil} = st, _iodata), do: st

  defp write(st, iodata) do
    Port.command(st.port, iodata)
    st
  end

  defp cancel_timer(nil), do: :ok
  defp cancel_timer(timer), do: Process.cancel_timer(timer)

  @impl true
  def terminate(reason, st) do
    st = fail_all(st, Error.worker_exit(reason))

    if st.port do
      send_frame(st, %{"type" => "shutdown"})
      Port.close(st.port)
    end
  catch
    # the port may be gone already
    :error, _ -> :ok
  end
end
