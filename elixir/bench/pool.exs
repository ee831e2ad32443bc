# Pool throughput for sizes 1, 2 and 4: dspy.predict on the scripted engine and echo,
# 200 concurrent callers each.  Run from elixir/:  mix run bench/pool.exs
# Each figure is the median of 3 runs; ratios are against size 1, measured in the same run.
defmodule DSPyBridge.Bench.Pool do
  alias DSPyBridge.{DSPy, Pool}

  @callers 200
  @runs 3
  # a reply that is never used up (a `when` with no inputs matches every call)
  @script [%{"when" => %{}, "reply" => %{"answer" => "4"}}]

  def main do
    rows =
      for size <- [1, 2, 4] do
        pool = start(size)
        predict = median(fn -> throughput(pool, 2_000, &predict/2) end)
        echo = median(fn -> throughput(pool, 40_000, &echo/2) end)
        :ok = Pool.drain(pool, 5_000)
        {size, predict, echo}
      end

    {_, base_predict, base_echo} = hd(rows)

    IO.puts(
      "schedulers #{System.schedulers_online()}, #{@callers} concurrent callers, median of #{@runs} runs\n"
    )

    IO.puts("| pool size | dspy.predict req/s | ratio | echo req/s | ratio |")
    IO.puts("|---|---|---|---|---|")

    for {size, p, e} <- rows do
      IO.puts(
        "| #{size} | #{round(p)} | #{fmt(p / base_predict)} | #{round(e)} | #{fmt(e / base_echo)} |"
      )
    end
  end

  defp start(size) do
    name = :"bench_pool_#{size}"

    on_start = fn w ->
      {:ok, _} = DSPy.configure_lm(w, "scripted/bench", %{"script" => @script})
    end

    {:ok, _} = Pool.start_link(name: name, size: size, worker: [on_start: on_start])
    # warm up every worker
    throughput(name, 200 * size, &predict/2)
    name
  end

  defp predict(pool, i) do
    {:ok, %{"answer" => "4"}} = DSPy.predict(pool, "question -> answer", %{question: "q#{i}"})
  end

  defp echo(pool, i), do: {:ok, %{"i" => ^i}} = DSPyBridge.call(pool, "echo", %{i: i})

  defp throughput(pool, total, fun) do
    per_caller = div(total, @callers)
    started = System.monotonic_time()

    1..@callers
    |> Enum.map(fn c ->
      Task.async(fn -> for i <- 1..per_caller, do: fun.(pool, c * per_caller + i) end)
    end)
    |> Task.await_many(:infinity)

    seconds =
      System.convert_time_unit(System.monotonic_time() - started, :native, :microsecond) / 1.0e6

    per_caller * @callers / seconds
  end

  defp median(fun),
    do: 1..@runs |> Enum.map(fn _ -> fun.() end) |> Enum.sort() |> Enum.at(div(@runs, 2))

  defp fmt(x), do: :erlang.float_to_binary(x, decimals: 2)
end

DSPyBridge.Bench.Pool.main()
