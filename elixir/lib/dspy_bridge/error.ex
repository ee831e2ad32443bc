defmodule DSPyBridge.Error do
  @moduledoc """
  An error answer: from the worker's `error` frame, or created by the library.

  The library creates these types itself: `"worker_exit"` (`details["exit_status"]`),
  `"timeout"` (the local backstop), `"encode_error"`, `"overloaded"` and
  `"session_lost"`. Every other type comes from the worker (see `docs/protocol.md`).
  `details` has string keys, like everything decoded from the worker.
  """
  defexception [:type, :message, details: %{}, traceback: nil]

  @type t :: %__MODULE__{
          type: String.t(),
          message: String.t(),
          details: map,
          traceback: String.t() | nil
        }

  @impl true
  def message(%__MODULE__{type: type, message: message}), do: "#{type}: #{message}"

  @doc "Builds an error from the `error` map of an `error` frame."
  @spec from_frame(map) :: t
  def from_frame(error) when is_map(error) do
    %__MODULE__{
      type: error["type"],
      message: error["message"],
      details: error["details"] || %{},
      traceback: error["traceback"]
    }
  end

  @doc false
  @spec worker_exit(term) :: t
  def worker_exit(status) when is_integer(status) do
    %__MODULE__{
      type: "worker_exit",
      message: "the worker's Python process exited with status #{status}",
      details: %{"exit_status" => status}
    }
  end

  def worker_exit(reason) do
    %__MODULE__{
      type: "worker_exit",
      message: "the worker is not running (#{inspect(reason)})",
      details: %{"reason" => inspect(reason)}
    }
  end
end
