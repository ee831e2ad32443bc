defmodule DSPyBridge.DSPy do
  @moduledoc """
  DSPy in Elixir: the worker's DSPy commands (`docs/dspy.md`) as functions.

  Every function takes the request options of `DSPyBridge.call/4`
  (`session_id:`, `timeout:`, `telemetry:`, `tools:`) in `opts`, next to its
  own (`module:`, `instructions:`, `config:`, ...). Signatures are DSPy strings
  (`"question -> answer"`) or maps as in `docs/dspy.md`. Outputs are maps with
  string keys.

  The streaming functions (`stream_chain_of_thought/4`, `stream_batch_predict/4`,
  `react/5` with `callback:`) send each event to `callback:` and return the
  final value, or, without a callback, return a lazy Enumerable of the events
  that raises `DSPyBridge.Error` on an error.
  """

  alias DSPyBridge.Error

  @request_options [:timeout, :session_id, :telemetry, :window, :tools]

  @typedoc "A DSPy signature: a string, or a map of inputs/outputs/instructions."
  @type signature :: String.t() | map
  @typedoc "Options: request options plus the function's own."
  @type opts :: keyword
  @typedoc "A ReAct tool with its Elixir implementation (see `DSPyBridge.Tools`)."
  @type tool :: %{
          required(:name) => String.t(),
          required(:fun) => DSPyBridge.Tools.tool(),
          optional(:description) => String.t(),
          optional(:parameters) => map
        }

  @doc """
  Gives the session an LM (`lm.configure`): `model` plus the LM's options.

      {:ok, %{"model" => "scripted/demo"}} =
        DSPyBridge.DSPy.configure_lm(w, "scripted/demo", %{"script" => [%{"answer" => "4"}]})
      {:ok, _} = DSPyBridge.DSPy.configure_lm(w, "openai/gpt-4o-mini", %{"temperature" => 0.2}, session_id: "s1")
  """
  @spec configure_lm(DSPyBridge.worker(), String.t(), map, opts) ::
          {:ok, map} | {:error, Error.t()}
  def configure_lm(w, model, lm_opts, opts \\ []) do
    DSPyBridge.call(w, "lm.configure", Map.put(lm_opts, "model", model), opts)
  end

  @doc """
  Runs a `Predict` (or `module:`) once: `dspy.predict`. Own options: `module:`, `instructions:`, `config:`.

      {:ok, %{"answer" => "4"}} = DSPyBridge.DSPy.predict(w, "question -> answer", %{question: "2+2?"})
  """
  @spec predict(DSPyBridge.worker(), signature, map, opts) :: {:ok, map} | {:error, Error.t()}
  def predict(w, signature, inputs, opts \\ []) do
    {args, request} = split(opts, [:module, :instructions, :config])

    with {:ok, %{"outputs" => outputs}} <-
           DSPyBridge.call(
             w,
             "dspy.predict",
             Map.merge(args, %{"signature" => signature, "inputs" => inputs}),
             request
           ),
         do: {:ok, outputs}
  end

  @doc "`predict/4` with `ChainOfThought`: the outputs gain `\"reasoning\"`."
  @spec chain_of_thought(DSPyBridge.worker(), signature, map, opts) ::
          {:ok, map} | {:error, Error.t()}
  def chain_of_thought(w, signature, inputs, opts \\ []),
    do: predict(w, signature, inputs, Keyword.put(opts, :module, "ChainOfThought"))

  @doc """
  Streams a `ChainOfThought` run (`dspy.stream`): `{:token, field, text}` as the
  LM writes, `{:status, message}`, then `{:complete, outputs}`. Own options:
  `fields:`, `instructions:`, `config:`, `callback:`.

      DSPyBridge.DSPy.stream_chain_of_thought(w, "question -> answer", %{question: "2+2?"},
        callback: fn
          {:token, "answer", text} -> IO.write(text)
          _ -> :ok
        end)
      #=> {:ok, %{"reasoning" => "...", "answer" => "4"}}
  """
  @spec stream_chain_of_thought(DSPyBridge.worker(), signature, map, opts) ::
          Enumerable.t() | {:ok, map} | {:error, Error.t()}
  def stream_chain_of_thought(w, signature, inputs, opts \\ []) do
    {callback, opts} = Keyword.pop(opts, :callback)
    {args, request} = split(opts, [:fields, :instructions, :config])

    args =
      Map.merge(args, %{
        "signature" => signature,
        "inputs" => inputs,
        "module" => "ChainOfThought"
      })

    w
    |> events("dspy.stream", args, request, &stream_event/1)
    |> deliver(callback, & &1["outputs"])
  end

  @doc """
  A ReAct agent whose tools are Elixir functions (`dspy.react`); returns
  `{:ok, outputs, trajectory}`.

  `tools` is a list of `%{name:, description:, parameters: json_schema, fun: fun/2}`;
  the LM's arguments arrive as the kwargs map. With `callback:` each step goes to
  the callback: `{:thought, step, text}`, `{:tool_call, step, name, args}` and
  `{:observation, step, {:ok, result} | {:error, %{"type" => t, "message" => m}}}`
  (and `{:token, field, text}` with `stream: true`). Own options: `max_iters:`,
  `stream:`, `fields:`, `config:`, `callback:`.

      search = %{name: "search", description: "Search the docs.",
                 parameters: %{"type" => "object", "properties" => %{"query" => %{"type" => "string"}}},
                 fun: fn [], %{"query" => q} -> MyApp.Search.run(q) end}
      {:ok, %{"answer" => answer}, trajectory} =
        DSPyBridge.DSPy.react(w, "question -> answer", %{question: "..."}, [search])
  """
  @spec react(DSPyBridge.worker(), signature, map, [tool], opts) ::
          {:ok, map, list} | {:error, Error.t()}
  def react(w, signature, inputs, tools, opts \\ []) do
    {callback, opts} = Keyword.pop(opts, :callback)
    {args, request} = split(opts, [:max_iters, :stream, :fields, :config])
    {specs, funs} = tool_specs(tools)
    args = Map.merge(args, %{"signature" => signature, "inputs" => inputs, "tools" => specs})
    request = Keyword.update(request, :tools, funs, &Map.merge(funs, &1))

    result =
      if callback do
        w
        |> events("dspy.react", args, request, &react_event/1)
        |> deliver(callback, &Function.identity/1, false)
      else
        DSPyBridge.call(w, "dspy.react", args, request)
      end

    with {:ok, %{"outputs" => outputs, "trajectory" => trajectory}} <- result,
         do: {:ok, outputs, trajectory}
  end

  @doc """
  Runs a program once per item (`dspy.batch`), yielding `{:item, index, outputs, progress}`
  or `{:item_error, index, %DSPyBridge.Error{}, progress}` as items finish, then
  `{:complete, summary}`. Own options: `module:`, `instructions:`, `config:`,
  `concurrency:`, `callback:`.
  """
  @spec stream_batch_predict(DSPyBridge.worker(), signature, [map], opts) ::
          Enumerable.t() | {:ok, map} | {:error, Error.t()}
  def stream_batch_predict(w, signature, items, opts \\ []) do
    {callback, opts} = Keyword.pop(opts, :callback)
    {args, request} = split(opts, [:module, :instructions, :config, :concurrency])
    args = Map.merge(args, %{"signature" => signature, "items" => items})

    w
    |> events("dspy.batch", args, request, &batch_event/1)
    |> deliver(callback, & &1)
  end

  # ---- programs and sessions by reference ----------------------------------------

  @doc """
  Creates a program held by the worker (`program.create`) and returns its ref.
  Own options: `instructions:`, `config:`, `tools:` for a ReAct program
  (tool maps as in `react/5`; their functions then serve every call of it).
  """
  @spec create_program(DSPyBridge.worker(), String.t(), signature, opts) ::
          {:ok, String.t()} | {:error, Error.t()}
  def create_program(w, module, signature, opts \\ []) do
    {args, request} = program_args(opts)
    args = Map.merge(args, %{"module" => module, "signature" => signature})

    with {:ok, %{"ref" => ref}} <- DSPyBridge.call(w, "program.create", args, request),
         do: {:ok, ref}
  end

  @doc "Calls a program by ref (`program.call`); returns its outputs."
  @spec call_program(DSPyBridge.worker(), String.t(), map, opts) ::
          {:ok, map} | {:error, Error.t()}
  def call_program(w, ref, inputs, opts \\ []) do
    {args, request} = program_args(opts)

    with {:ok, %{"outputs" => outputs}} <-
           DSPyBridge.call(
             w,
             "program.call",
             Map.merge(args, %{"ref" => ref, "inputs" => inputs}),
             request
           ),
         do: {:ok, outputs}
  end

  @doc "DSPy's saved state of a program (`program.save`): plain data to keep and `load_program/5` later."
  @spec save_program(DSPyBridge.worker(), String.t(), opts) :: {:ok, map} | {:error, Error.t()}
  def save_program(w, ref, opts \\ []) do
    with {:ok, %{"state" => state}} <- DSPyBridge.call(w, "program.save", %{"ref" => ref}, opts),
         do: {:ok, state}
  end

  @doc "Builds a program from saved state (`program.load`), for example in a restarted worker; returns its ref."
  @spec load_program(DSPyBridge.worker(), String.t(), signature, map, opts) ::
          {:ok, String.t()} | {:error, Error.t()}
  def load_program(w, module, signature, state, opts \\ []) do
    {args, request} = program_args(opts)
    args = Map.merge(args, %{"module" => module, "signature" => signature, "state" => state})

    with {:ok, %{"ref" => ref}} <- DSPyBridge.call(w, "program.load", args, request),
         do: {:ok, ref}
  end

  @doc "Closes a session (`session.close`): its LM, programs and pipelines go with it."
  @spec close_session(DSPyBridge.worker(), String.t()) :: :ok | {:error, Error.t()}
  def close_session(w, session_id) do
    with {:ok, _} <- DSPyBridge.call(w, "session.close", %{}, session_id: session_id), do: :ok
  end

  # ---- helpers -------------------------------------------------------------------

  # Tool maps in `tools:` become the worker's specs plus this request's functions.
  defp program_args(opts) do
    {tools, opts} = Keyword.pop(opts, :tools)
    {args, request} = split(opts, [:instructions, :config, :stream, :fields])

    if tools do
      {specs, funs} = tool_specs(tools)
      {Map.put(args, "tools", specs), Keyword.put(request, :tools, funs)}
    else
      {args, request}
    end
  end

  defp tool_specs(tools) do
    specs = Enum.map(tools, &(&1 |> Map.take([:name, :description, :parameters]) |> stringify()))
    {specs, Map.new(tools, &{&1.name, &1.fun})}
  end

  @doc false
  # Splits opts into the command's args (string keys) and the request's options.
  @spec split(keyword, [atom]) :: {map, keyword}
  def split(opts, command_keys) do
    {command, request} = Keyword.split(opts, command_keys)
    {request, unknown} = Keyword.split(request, @request_options)

    if unknown != [],
      do: raise(ArgumentError, "unknown options #{inspect(Keyword.keys(unknown))}")

    {stringify(Map.new(command)), request}
  end

  defp stringify(map), do: Map.new(map, fn {k, v} -> {to_string(k), v} end)

  @doc false
  # The request's stream with each chunk mapped to events; the result becomes {:complete, data}.
  @spec events(DSPyBridge.worker(), String.t(), map, keyword, (map -> [tuple])) :: Enumerable.t()
  def events(w, command, args, request, chunk_event) do
    w
    |> DSPyBridge.stream(command, args, request)
    |> Stream.flat_map(fn
      {:chunk, data} -> chunk_event.(data)
      {:result, data} -> [{:complete, data}]
    end)
  end

  @doc false
  # Without a callback, the events (with {:complete, final.(data)}); with one, {:ok, final value}.
  @spec deliver(Enumerable.t(), (tuple -> term) | nil, (term -> term), boolean) ::
          Enumerable.t() | {:ok, term} | {:error, Error.t()}
  def deliver(events, callback, final, forward_complete? \\ true)

  def deliver(events, nil, final, _),
    do:
      Stream.map(events, fn
        {:complete, data} -> {:complete, final.(data)}
        e -> e
      end)

  def deliver(events, callback, final, forward_complete?) do
    Enum.reduce(events, nil, fn
      {:complete, data}, _ ->
        value = final.(data)
        if forward_complete?, do: callback.({:complete, value})
        {:ok, value}

      event, acc ->
        callback.(event)
        acc
    end)
  rescue
    e in Error -> {:error, e}
  end

  defp stream_event(%{"event" => "token", "field" => f, "text" => t}), do: [{:token, f, t}]
  defp stream_event(%{"event" => "status", "message" => m}), do: [{:status, m}]
  defp stream_event(_), do: []

  defp react_event(%{"event" => "thought", "step" => s, "text" => t}), do: [{:thought, s, t}]

  defp react_event(%{"event" => "tool_call", "step" => s, "tool" => n, "args" => a}),
    do: [{:tool_call, s, n, a}]

  defp react_event(%{"event" => "observation", "step" => s, "error" => e}),
    do: [{:observation, s, {:error, e}}]

  defp react_event(%{"event" => "observation", "step" => s} = c),
    do: [{:observation, s, {:ok, c["result"]}}]

  defp react_event(%{"event" => "token", "field" => f, "text" => t}), do: [{:token, f, t}]
  defp react_event(_), do: []

  defp batch_event(%{"event" => "item", "index" => i, "outputs" => o, "progress" => p}),
    do: [{:item, i, o, p}]

  defp batch_event(%{"event" => "item_error", "index" => i, "error" => e, "progress" => p}),
    do: [{:item_error, i, Error.from_frame(e), p}]

  defp batch_event(_), do: []
end
