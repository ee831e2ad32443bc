defmodule DSPyBridge.Composer do
  @moduledoc """
  Pipelines built in Elixir, compiled to the worker's `pipeline.run` spec (`docs/pipelines.md`).

  Steps run over one map of fields, which starts as the inputs; each module
  step reads its signature's inputs from the fields and merges its outputs in.

      alias DSPyBridge.Composer

      pipeline =
        Composer.new()
        |> Composer.predict("classify", "text -> label")
        |> Composer.branch(
          "label == 'spam'",
          &Composer.chain_of_thought(&1, "refuse", "label -> reply"),
          &Composer.parallel(&1, [
            {nil, Composer.predict(Composer.new(), "summarize", "text, label -> summary")},
            {"style", Composer.predict(Composer.new(), "tone", "label -> tone")}
          ])
        )

      {:ok, %{"label" => "ham", "summary" => _, "style" => %{"tone" => _}}} =
        Composer.run(pipeline, w, %{text: "hello there"})

  The condition is the worker's small expression language over the fields
  (never evaluated as code). A lane `{nil, composer}` merges its outputs into the
  fields; `{"name", composer}` puts them under one field, `name`.
  """

  alias DSPyBridge.DSPy

  defstruct steps: [], config: nil

  @typedoc "A pipeline under construction (steps are kept in reverse)."
  @type t :: %__MODULE__{steps: [map], config: map | nil}

  @doc "An empty pipeline. `config:` is the module config (e.g. `%{\"temperature\" => 0.2}`) of every step that sets none."
  @spec new(keyword) :: t
  def new(opts \\ []), do: %__MODULE__{config: opts[:config]}

  @doc "Adds a `Predict` step. Options: `instructions:`, `config:`."
  @spec predict(t, String.t(), DSPy.signature(), keyword) :: t
  def predict(c, name, signature, opts \\ []),
    do: module_step(c, "Predict", name, signature, opts)

  @doc "Adds a `ChainOfThought` step (it also writes the `reasoning` field). Options as `predict/4`."
  @spec chain_of_thought(t, String.t(), DSPy.signature(), keyword) :: t
  def chain_of_thought(c, name, signature, opts \\ []),
    do: module_step(c, "ChainOfThought", name, signature, opts)

  @doc """
  Adds a branch: `then_fun` (and `else_fun`, if any) get an empty composer and
  return the steps of that arm.
  """
  @spec branch(t, String.t(), (t -> t), (t -> t) | nil) :: t
  def branch(c, condition, then_fun, else_fun \\ nil) do
    arms = %{"if" => condition, "then" => arm(c, then_fun)}
    arms = if else_fun, do: Map.put(arms, "else", arm(c, else_fun)), else: arms
    add(c, %{"branch" => arms})
  end

  @doc "Adds lanes that run at once, each on its own copy of the fields: `[{as | nil, composer}, ...]`."
  @spec parallel(t, [{String.t() | nil, t}]) :: t
  def parallel(c, lanes) do
    add(c, %{"parallel" => Enum.map(lanes, &lane/1)})
  end

  @doc "The worker's pipeline spec: the list of steps."
  @spec to_spec(t) :: [map]
  def to_spec(%__MODULE__{steps: steps}), do: Enum.reverse(steps)

  @doc "Runs the pipeline (`pipeline.run`); returns the final fields. `opts` are request options."
  @spec run(t, DSPyBridge.worker(), map, keyword) :: {:ok, map} | {:error, DSPyBridge.Error.t()}
  def run(c, w, inputs, opts \\ []) do
    DSPyBridge.call(w, "pipeline.run", %{"steps" => to_spec(c), "inputs" => inputs}, opts)
  end

  @doc """
  Runs the pipeline as a stream of `{:step, name, outputs}`, `{:branch, condition, :then | :else}`
  and `{:complete, fields}`; with `callback:` each event goes to it and the call returns `{:ok, fields}`.
  """
  @spec stream(t, DSPyBridge.worker(), map, keyword) ::
          Enumerable.t() | {:ok, map} | {:error, DSPyBridge.Error.t()}
  def stream(c, w, inputs, opts \\ []) do
    {callback, opts} = Keyword.pop(opts, :callback)
    {_, request} = DSPy.split(opts, [])

    w
    |> DSPy.events(
      "pipeline.run",
      %{"steps" => to_spec(c), "inputs" => inputs},
      request,
      &event/1
    )
    |> DSPy.deliver(callback, & &1)
  end

  defp module_step(c, module, name, signature, opts) do
    step =
      %{"name" => to_string(name), "module" => module, "signature" => signature}
      |> put("instructions", opts[:instructions])
      |> put("config", opts[:config] || c.config)

    add(c, step)
  end

  defp arm(c, fun), do: to_spec(fun.(%__MODULE__{config: c.config}))

  defp lane({nil, composer}), do: to_spec(composer)
  defp lane({as, composer}), do: %{"as" => to_string(as), "steps" => to_spec(composer)}

  defp add(c, step), do: %{c | steps: [step | c.steps]}

  defp put(map, _key, nil), do: map
  defp put(map, key, value), do: Map.put(map, key, value)

  defp event(%{"event" => "step_complete", "name" => name, "outputs" => outputs}),
    do: [{:step, name, outputs}]

  defp event(%{"event" => "branch", "condition" => condition, "taken" => "then"}),
    do: [{:branch, condition, :then}]

  defp event(%{"event" => "branch", "condition" => condition, "taken" => "else"}),
    do: [{:branch, condition, :else}]

  defp event(_), do: []
end
