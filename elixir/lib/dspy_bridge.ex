defmodule DSPyBridge do
  @moduledoc """
  Requests to a `DSPyBridge.Worker`: one answer (`call/4`), a lazy stream
  (`stream/4`) or messages to the caller (`async/4`).

  Options of all three:

    * `timeout:` ms, or `:infinity` (the default for `stream/4` and `async/4`;
      `call/4` defaults to 30_000). A number is sent as the request's
      `timeout_ms`, and a local backstop fires at timeout + 1 s, sending
      `cancel`. Either way the caller gets exactly one `timeout` error.
    * `session_id:` the worker session the request runs in.
    * `telemetry:` true asks the worker for `telemetry` frames (see `DSPyBridge.Worker`).
    * `window:` n (stream and async) the chunks the worker may send ahead of
      `credit/3`. `stream/4` defaults to 64 and grants credit itself.
    * `tools:` `%{name => fun/2}`, merged over the worker's own tools.

  A worker that is dead or not registered gives a `worker_exit` error, never an exit signal.
  Wherever a worker is expected, the name of a `DSPyBridge.Pool` works too.
  """

  alias DSPyBridge.Error

  @typedoc "A worker pid or name, or a pool's name."
  @type worker :: GenServer.server()
  @typedoc "Request options (see the module doc)."
  @type option ::
          {:timeout, timeout}
          | {:session_id, String.t()}
          | {:telemetry, boolean}
          | {:window, pos_integer}
          | {:tools, %{String.t() => DSPyBridge.Tools.tool()}}
  @typedoc "What `stream/4` yields."
  @type item :: {:chunk, term} | {:result, term}

  @options [:timeout, :session_id, :telemetry, :window, :tools]

  @doc """
  Sends one request and waits for its answer; chunks of a streaming command are discarded.

      {:ok, %{"pong" => true}} = DSPyBridge.call(w, "ping", %{})
  """
  @spec call(worker, String.t(), map, [option]) :: {:ok, term} | {:error, Error.t()}
  def call(worker, command, args \\ %{}, opts \\ []) do
    with {:ok, ref, pid} <-
           request(worker, command, args, Keyword.put_new(opts, :timeout, 30_000)) do
      mon = Process.monitor(pid)
      await(ref, mon)
    end
  end

  defp await(ref, mon) do
    receive do
      {:dspy_bridge, ^ref, {:chunk, _}} ->
        await(ref, mon)

      {:dspy_bridge, ^ref, {tag, value}} ->
        Process.demonitor(mon, [:flush])
        {if(tag == :result, do: :ok, else: :error), value}

      {:DOWN, ^mon, :process, _, reason} ->
        {:error, Error.worker_exit(reason)}
    end
  end

  @doc """
  Sends a request whose answer arrives as messages to the caller:
  `{:dspy_bridge, ref, {:chunk, data}}` for each chunk, then exactly one of
  `{:dspy_bridge, ref, {:result, data}}` or `{:dspy_bridge, ref, {:error, %DSPyBridge.Error{}}}`.

  With `window: n` the worker sends at most n chunks ahead of `credit/3`;
  without it, nothing bounds the caller's mailbox.
  """
  @spec async(worker, String.t(), map, [option]) :: {:ok, reference} | {:error, Error.t()}
  def async(worker, command, args \\ %{}, opts \\ []) do
    with {:ok, ref, _pid} <- request(worker, command, args, opts), do: {:ok, ref}
  end

  @doc "Cancels a request started with `async/4`; its terminal message still comes. `:ok` for any ref."
  @spec cancel(worker, reference) :: :ok
  def cancel(worker, ref), do: cast(worker, {:cancel, ref})

  @doc "Grants `n` more chunks to a request started with `async/4` and `window:`."
  @spec credit(worker, reference, pos_integer) :: :ok
  def credit(worker, ref, n) when is_integer(n) and n > 0, do: cast(worker, {:credit, ref, n})

  # A pool does not know which of its workers holds a ref: every one gets the
  # message, and those that do not know the ref ignore it.
  defp cast(target, message) do
    case DSPyBridge.Pool.lookup(target) do
      nil ->
        GenServer.cast(target, message)

      config ->
        for pid <- DSPyBridge.Pool.all_workers(target, config), do: GenServer.cast(pid, message)
    end

    :ok
  end

  @doc """
  A lazy stream of a request's chunks, `{:chunk, data}`, then `{:result, data}`.

      DSPyBridge.stream(w, "stream_count", %{n: 3}) |> Enum.to_list()
      #=> [{:chunk, 0}, {:chunk, 1}, {:chunk, 2}, {:result, nil}]

  The request is sent when enumeration starts, from the enumerating process
  (each enumeration runs it again). Credit is granted as chunks are taken, so
  the caller's mailbox never holds more than `window:` (default 64) chunks. An
  error frame raises `DSPyBridge.Error`. Halting early cancels the request, and
  no message of it is left in the mailbox.
  """
  @spec stream(worker, String.t(), map, [option]) :: Enumerable.t()
  def stream(worker, command, args \\ %{}, opts \\ []) do
    opts = Keyword.put_new(opts, :window, 64)
    Stream.resource(fn -> open_stream(worker, command, args, opts) end, &next/1, &close/1)
  end

  defp open_stream(worker, command, args, opts) do
    case request(worker, command, args, opts) do
      {:ok, ref, pid} ->
        grant = max(div(opts[:window], 2), 1)
        %{worker: pid, ref: ref, mon: Process.monitor(pid), grant: grant, taken: 0, done: false}

      {:error, error} ->
        raise error
    end
  end

  defp next(%{done: true} = s), do: {:halt, s}

  defp next(%{ref: ref, mon: mon} = s) do
    receive do
      {:dspy_bridge, ^ref, {:chunk, data}} -> {[{:chunk, data}], take(s)}
      {:dspy_bridge, ^ref, {:result, data}} -> {[{:result, data}], %{s | done: true}}
      {:dspy_bridge, ^ref, {:error, error}} -> raise error
      {:DOWN, ^mon, :process, _, reason} -> raise Error.worker_exit(reason)
    end
  end

  defp take(%{taken: taken, grant: grant} = s) when taken + 1 < grant, do: %{s | taken: taken + 1}

  defp take(s) do
    credit(s.worker, s.ref, s.grant)
    %{s | taken: 0}
  end

  # After a halt, a raise or the end: forget the request in the worker, then
  # drop whatever of it already reached the mailbox (nothing follows the reply).
  defp close(%{ref: ref, mon: mon} = s) do
    Process.demonitor(mon, [:flush])

    unless s.done do
      try do
        GenServer.call(s.worker, {:abandon, ref}, :infinity)
      catch
        :exit, _ -> :ok
      end
    end

    flush(ref)
  end

  defp flush(ref) do
    receive do
      {:dspy_bridge, ^ref, _} -> flush(ref)
    after
      0 -> :ok
    end
  end

  # The worker registers the request and routes its answers; a caller on the worker's node
  # encodes the request with the worker's codec and writes it to the port itself
  # (`send_request/5`). A term the codec refuses raises here, in the caller, before anything
  # is written.
  defp request(worker, command, args, opts) do
    opts = Keyword.validate!(opts, @options)
    id = System.unique_integer([:positive])
    ref = make_ref()
    timeout = if is_integer(opts[:timeout]), do: opts[:timeout]

    frame =
      %{"type" => "request", "id" => id, "command" => command, "args" => args}
      |> put("session_id", opts[:session_id])
      |> put("timeout_ms", timeout)
      |> put("window", opts[:window])
      |> put("telemetry", opts[:telemetry])

    req = %{
      command: command,
      session_id: opts[:session_id],
      timeout: timeout,
      tools: opts[:tools] || %{}
    }

    send_fun = &send_request(&1, ref, id, frame, req)

    case DSPyBridge.Pool.lookup(worker) do
      nil -> send_fun.(worker)
      config -> DSPyBridge.Pool.request(worker, config, opts[:session_id], command, send_fun)
    end
  end

  # A local worker's caller encodes and writes its own frame. Frames never cross nodes: a
  # worker on another node gets the request as a term, encodes it and writes it itself.
  defp send_request(worker, ref, id, frame, req) do
    if local?(worker),
      do: GenServer.call(worker, {:request, ref, id, req}, :infinity),
      else: GenServer.call(worker, {:request, ref, id, req, frame}, :infinity)
  catch
    :exit, reason -> {:error, Error.worker_exit(exit_reason(reason))}
  else
    {:ok, pid, port, codec} -> write_request(pid, port, codec, ref, frame)
    {:ok, pid} -> {:ok, ref, pid}
    {:raise, exception} -> raise exception
    {:error, error} -> {:error, error}
  end

  defp local?(worker) do
    case GenServer.whereis(worker) do
      pid when is_pid(pid) -> node(pid) == node()
      _ -> false
    end
  end

  # Whatever the codec raises, throws or exits with, and an open port's refusal of what the
  # codec returned, leave nothing registered and reach the caller as they were. A closed port
  # is no error here: the worker answers the request with its worker_exit error.
  defp write_request(pid, port, codec, ref, frame) do
    iodata = codec.pack!(frame)
    # what no port takes raises ArgumentError here, not a badarg (and a VM error log) in the port
    _ = IO.iodata_length(iodata)
    DSPyBridge.Worker.command(port, iodata)
    {:ok, ref, pid}
  catch
    kind, reason ->
      DSPyBridge.Worker.forget(pid, ref)
      :erlang.raise(kind, reason, __STACKTRACE__)
  end

  defp put(map, _key, nil), do: map
  defp put(map, key, value), do: Map.put(map, key, value)

  defp exit_reason({reason, {GenServer, :call, _}}), do: reason
  defp exit_reason(reason), do: reason
end
