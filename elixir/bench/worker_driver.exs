# The bench's line-protocol peer through DSPyBridge.Worker, what users run (bench/port.py).
# Run from elixir/:  mix run bench/worker_driver.exs PYTHON [SERVE_ARG...]
# It prints {"event":"ready","ms":M,"os_pid":P}, then answers one JSON line per command:
#   warm               until the worker's background DSPy import is done
#   echo_pipe N DEPTH  echo round trips/s, DEPTH callers in flight, timed here
defmodule DSPyBridge.Bench.WorkerDriver do
  alias DSPyBridge.Worker

  def main([python | args]) do
    t0 = System.monotonic_time()
    {:ok, w} = Worker.start_link(python: python, args: args)
    ms = ms_since(t0)
    reply(%{"event" => "ready", "ms" => ms, "os_pid" => Worker.info(w)["pid"]})
    serve(w)
  end

  defp serve(w) do
    case IO.read(:stdio, :line) do
      :eof ->
        :ok

      line ->
        [scenario | ints] = String.split(String.trim(line))
        reply(run(w, scenario, Enum.map(ints, &String.to_integer/1)))
        serve(w)
    end
  end

  defp run(w, "warm", []) do
    if DSPyBridge.call(w, "stats", %{}) |> elem(1) |> Map.get("warm") do
      %{"value" => true}
    else
      Process.sleep(20)
      run(w, "warm", [])
    end
  end

  defp run(w, "echo_pipe", [n, depth]) do
    counter = :atomics.new(1, [])
    t0 = System.monotonic_time()

    1..depth
    |> Enum.map(fn _ -> Task.async(fn -> caller(w, counter, n) end) end)
    |> Enum.each(&Task.await(&1, :infinity))

    %{"value" => n / (ms_since(t0) / 1000)}
  end

  defp run(_w, scenario, _ints), do: %{"error" => "unknown scenario #{scenario}"}

  defp caller(w, counter, n) do
    i = :atomics.add_get(counter, 1, 1)

    if i <= n do
      {:ok, %{"x" => ^i}} = DSPyBridge.call(w, "echo", %{x: i})
      caller(w, counter, n)
    end
  end

  defp ms_since(t0),
    do: System.convert_time_unit(System.monotonic_time() - t0, :native, :microsecond) / 1000

  defp reply(map), do: IO.puts(json(map))

  defp json(map) do
    "{" <> Enum.map_join(map, ",", fn {k, v} -> "\"#{k}\":#{value(v)}" end) <> "}"
  end

  defp value(v) when is_binary(v), do: inspect(v)
  defp value(v) when is_boolean(v), do: to_string(v)
  defp value(v) when is_integer(v), do: Integer.to_string(v)
  defp value(v) when is_float(v), do: Float.to_string(v)
end

DSPyBridge.Bench.WorkerDriver.main(System.argv())
