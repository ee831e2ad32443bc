defmodule DSPyBridge.Tools do
  @moduledoc """
  Host tools: Elixir functions the worker calls through `rpc_request`.

  A tool is a 2-arity function `(args :: list, kwargs :: map)`; `kwargs` has
  string keys. Its return becomes the `rpc_response`:

    * `{:ok, value}` or any other plain value: `ok: true`;
    * `{:error, type, message}`: `ok: false` with that type and message;
    * `{:error, reason}`: type `"error"`, message `inspect(reason)`;
    * a raise, throw or exit: type `"exception"`;
    * a value the codec cannot encode: type `"encode_error"`.

  The worker process runs each call in a task under `DSPyBridge.TaskSupervisor`
  (see `DSPyBridge.Worker`); this module holds what runs inside that task.
  """

  @typedoc "A host tool."
  @type tool :: (list, map -> term)
  @typedoc "A tool's outcome, before encoding."
  @type outcome :: {:ok, term} | {:error, String.t(), String.t()}

  @doc "Runs `fun` and turns whatever it returns, raises, throws or exits with into an outcome."
  @spec run(tool, list, map) :: outcome
  def run(fun, args, kwargs) do
    case fun.(args, kwargs) do
      {:ok, value} -> {:ok, value}
      {:error, type, message} -> {:error, to_string(type), to_string(message)}
      {:error, reason} -> {:error, "error", inspect(reason)}
      value -> {:ok, value}
    end
  rescue
    e -> {:error, "exception", "#{inspect(e.__struct__)}: #{Exception.message(e)}"}
  catch
    kind, reason -> {:error, "exception", "#{kind}: #{inspect(reason)}"}
  end

  @doc """
  Encodes the `rpc_response` frame for `outcome` with `codec`.

  A result the codec refuses (whatever it raises) is answered as an `encode_error` instead.
  """
  @spec response(term, outcome, module) :: iodata
  def response(rpc_id, {:ok, value}, codec) do
    codec.pack!(%{"type" => "rpc_response", "rpc_id" => rpc_id, "ok" => true, "result" => value})
  rescue
    # any codec's refusal (ArgumentError for DSPyBridge.Msgpack, Msgpax.PackError for Msgpax)
    e -> response(rpc_id, {:error, "encode_error", Exception.message(e)}, codec)
  end

  def response(rpc_id, {:error, type, message}, codec) do
    error = %{"type" => type, "message" => message}
    codec.pack!(%{"type" => "rpc_response", "rpc_id" => rpc_id, "ok" => false, "error" => error})
  end

  @doc "The answer for a tool name that neither the request nor the worker has."
  @spec unknown(String.t(), [String.t()]) :: outcome
  def unknown(name, known) do
    {:error, "unknown_tool",
     "no host tool #{inspect(name)}; this request has #{inspect(Enum.sort(known))}"}
  end
end
