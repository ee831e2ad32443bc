defmodule DSPyBridge.Launch do
  @moduledoc """
  Opens the port to `python -m bridge serve` and waits for the `ready` frame.

  A port cannot read the worker's stderr (it goes to the VM's stderr), so when
  the worker does not come up this module runs `python -c "import bridge"` to
  tell a Python without `bridge` from a worker that failed for another reason,
  and returns a hint that says what to do.
  """

  @typedoc "Why a worker did not start: its exit status, `:enoent`, `:eacces` or `:timeout`."
  @type reason :: non_neg_integer | :enoent | :eacces | :timeout

  @doc "Opens the port; returns it with the decoded `ready` frame, or `{:error, {:worker_start, reason, hint}}`."
  @spec open(keyword, module) :: {:ok, port, map} | {:error, {:worker_start, reason, String.t()}}
  def open(opts, codec) do
    python = python(opts)
    timeout = Keyword.get(opts, :start_timeout, 10_000)

    with {:ok, port} <- spawn_port(python, opts),
         {:ok, ready} <- await_ready(port, codec, timeout) do
      {:ok, port, ready}
    else
      {:error, reason} -> {:error, {:worker_start, reason, hint(reason, python, opts, timeout)}}
    end
  end

  @doc """
  The Python to run: the `python:` option, then `config :dspy_bridge, :python`,
  then `$DSPY_BRIDGE_PYTHON`, then `python3` on `PATH`.
  """
  @spec python(keyword) :: String.t()
  def python(opts) do
    opts[:python] || Application.get_env(:dspy_bridge, :python) ||
      System.get_env("DSPY_BRIDGE_PYTHON") || "python3"
  end

  defp spawn_port(python, opts) do
    stdio? = Keyword.get(opts, :use_stdio, true)
    fds = if stdio?, do: [], else: ["--fds", "3,4"]

    port_opts =
      [
        {:packet, 4},
        :binary,
        :exit_status,
        if(stdio?, do: :use_stdio, else: :nouse_stdio),
        args: ["-m", "bridge", "serve" | Keyword.get(opts, :args, [])] ++ fds,
        env: Enum.map(Keyword.get(opts, :env, []), fn {k, v} -> {~c"#{k}", ~c"#{v}"} end)
      ] ++ if(opts[:cd], do: [cd: opts[:cd]], else: [])

    case executable(python) do
      nil -> {:error, :enoent}
      path -> {:ok, Port.open({:spawn_executable, path}, port_opts)}
    end
  rescue
    e in ErlangError -> {:error, e.original}
  end

  defp executable(python) do
    if String.contains?(python, "/"), do: python, else: System.find_executable(python)
  end

  defp await_ready(port, codec, timeout) do
    receive do
      {^port, {:data, data}} -> check_ready(port, decode(codec, data))
      {^port, {:exit_status, status}} -> {:error, status}
    after
      timeout ->
        kill(port)
        {:error, :timeout}
    end
  end

  defp check_ready(_port, %{"type" => "ready"} = ready), do: {:ok, ready}

  # Not a ready frame (something else wrote to the frame stream first): as if none came.
  defp check_ready(port, _frame) do
    kill(port)
    {:error, :timeout}
  end

  defp decode(codec, data) do
    codec.unpack!(data)
  rescue
    _ -> :undecodable
  end

  defp kill(port) do
    with {:os_pid, pid} <- Port.info(port, :os_pid), do: System.cmd("kill", ["-9", "#{pid}"])
    Port.close(port)
  rescue
    # the port closed itself when the killed process exited
    ArgumentError -> true
  end

  @doc false
  @spec hint(reason, String.t(), keyword, timeout) :: String.t()
  def hint(:enoent, python, _opts, _timeout) do
    "#{python} was not found. Pass python: (or set config :dspy_bridge, :python, or " <>
      "$DSPY_BRIDGE_PYTHON) to the python of a venv where bridge is installed " <>
      "(python -m venv .venv && .venv/bin/pip install /path/to/bridge)."
  end

  def hint(:eacces, python, _opts, _timeout) do
    "#{python} is not executable. Pass python: the path of a Python interpreter (for example .venv/bin/python)."
  end

  def hint(reason, python, opts, timeout) do
    case probe(python, opts) do
      {:missing, why} ->
        "#{python} cannot import bridge (#{why}). Install it into that Python " <>
          "(#{python} -m pip install /path/to/bridge) or pass python: the venv's python that has it."

      :ok ->
        worker_failed(reason, opts, timeout)
    end
  end

  defp worker_failed(:timeout, _opts, timeout) do
    "The worker sent no ready frame within #{timeout} ms. Raise start_timeout: on a slow machine; " <>
      "a library printing to stdout before the frame loop started also causes this."
  end

  defp worker_failed(status, opts, _timeout) do
    "`python -m bridge serve #{Enum.join(Keyword.get(opts, :args, []), " ")}` exited with status " <>
      "#{status} before its ready frame; its stderr (on this VM's stderr) says why. " <>
      "Status 2 is a bad option in args: or a --handlers module that cannot be imported."
  end

  defp probe(python, opts) do
    env = Keyword.get(opts, :env, [])
    cmd_opts = [stderr_to_stdout: true, env: env] ++ if(opts[:cd], do: [cd: opts[:cd]], else: [])

    case System.cmd(executable(python), ["-c", "import bridge"], cmd_opts) do
      {_, 0} -> :ok
      {out, _} -> {:missing, out |> String.trim() |> String.split("\n") |> List.last()}
    end
  end
end
