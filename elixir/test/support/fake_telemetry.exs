# A stand-in for the :telemetry library (Hex is out of reach): attach/4 and execute/3.
defmodule :telemetry do
  def attach(id, event, fun, config) do
    handlers = :persistent_term.get(__MODULE__, %{})
    :persistent_term.put(__MODULE__, Map.put(handlers, id, {event, fun, config}))
  end

  def execute(event, measurements, metadata) do
    for {_id, {^event, fun, config}} <- :persistent_term.get(__MODULE__, %{}) do
      fun.(event, measurements, metadata, config)
    end

    :ok
  end
end
