# A stand-in for the :telemetry library (Hex is out of reach): attach/4 and execute/3.
defmodule :telemetry do
  def attach(id, event, fun, config) do
    :persistent_term.put({__MODULE__, id}, {event, fun, config})
  end

  def execute(event, measurements, metadata) do
    for {{__MODULE__, _}, {^event, fun, config}} <- :persistent_term.get() do
      fun.(event, measurements, metadata, config)
    end

    :ok
  end
end
