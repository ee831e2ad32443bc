defmodule DSPyBridge.WorkerTest do
  use ExUnit.Case, async: true

  import DSPyBridge.TestHelpers
  alias DSPyBridge.{Error, Worker}

  describe "starting" do
    test "start_link returns after ready; info is the ready frame" do
      w = start_worker!()
      info = Worker.info(w)
      assert info["protocol"] == 1 and is_integer(info["pid"])
      assert "ping" in info["commands"] and "meta" in info["capabilities"]
      assert {:ok, %{"pong" => true}} = DSPyBridge.call(w, "ping", %{})
    end

    test "use_stdio: false runs the worker on fds 3 and 4 the same way" do
      w = start_worker!(use_stdio: false, args: ["--diagnostics"])
      assert {:ok, %{"x" => [1, "two"]}} = DSPyBridge.call(w, "echo", %{x: [1, "two"]})

      assert [{:chunk, 0}, {:chunk, 1}, {:result, nil}] =
               Enum.to_list(DSPyBridge.stream(w, "stream_count", %{n: 2}))
    end

    test "a python that does not exist: enoent and a hint" do
      assert {:error, {:worker_start, :enoent, hint}} =
               Worker.start(python: "/nonexistent/python3")

      assert hint =~ "/nonexistent/python3 was not found" and hint =~ "DSPY_BRIDGE_PYTHON"
    end

    test "a python without bridge: its exit status and a hint naming the import error" do
      dir =
        Path.join(
          System.tmp_dir!(),
          "dspy_bridge_no_bridge_#{System.unique_integer([:positive])}"
        )

      File.mkdir_p!(dir)
      on_exit(fn -> File.rm_rf!(dir) end)
      # -I -S: no PYTHONPATH, cwd or site-packages, as in a Python where bridge is not installed
      script = Path.join(dir, "python")
      File.write!(script, "#!/bin/sh\nexec python3 -I -S \"$@\"\n")
      File.chmod!(script, 0o755)
      assert {:error, {:worker_start, 1, hint}} = Worker.start(python: script, cd: dir)
      assert hint =~ "cannot import bridge" and hint =~ "No module named"
    end

    test "a first frame that is not ready: the process is killed, :timeout with a hint" do
      path =
        Path.join(System.tmp_dir!(), "dspy_bridge_stray_#{System.unique_integer([:positive])}")

      on_exit(fn -> File.rm(path) end)

      # "import bridge" succeeds; serving writes a 2-byte frame that is not a msgpack map, then hangs
      File.write!(path, """
      #!/bin/sh
      [ "$1" = "-c" ] && exit 0
      printf '\\000\\000\\000\\002ab'
      exec sleep 60
      """)

      File.chmod!(path, 0o755)
      assert {:error, {:worker_start, :timeout, hint}} = Worker.start(python: path)
      assert hint =~ "printing to stdout"
    end

    test "a file that is not executable: eacces" do
      path =
        Path.join(System.tmp_dir!(), "dspy_bridge_not_exec_#{System.unique_integer([:positive])}")

      on_exit(fn -> File.rm(path) end)
      File.write!(path, "")
      File.chmod!(path, 0o644)
      assert {:error, {:worker_start, :eacces, hint}} = Worker.start(python: path)
      assert hint =~ "not executable"
    end

    test "an option serve does not know: status 2 and a hint about args" do
      assert {:error, {:worker_start, 2, hint}} = Worker.start(args: ["--no-such-option"])
      assert hint =~ "status 2" and hint =~ "args:"
    end

    test "codec: replaces the codec for every frame both ways" do
      alias DSPyBridge.CountingCodec
      {packs, unpacks} = {CountingCodec.get(:pack), CountingCodec.get(:unpack)}
      w = start_worker!(codec: CountingCodec)
      assert {:ok, %{"a" => 1}} = DSPyBridge.call(w, "echo", %{a: 1})
      # ready and the result were decoded, the request encoded, by the codec given
      assert CountingCodec.get(:pack) - packs >= 1 and CountingCodec.get(:unpack) - unpacks >= 2
    end

    test "a codec that fails in the caller leaves nothing registered, and the worker serves on" do
      w = start_worker!(codec: DSPyBridge.FaultyCodec)
      # what the codec returned is no iodata: the caller's error, not a hang
      assert_raise ArgumentError, fn -> DSPyBridge.call(w, "echo", %{"fault" => "iodata"}) end
      assert catch_throw(DSPyBridge.call(w, "echo", %{"fault" => "throw"})) == :faulty_codec
      assert nothing_registered?(w)
      assert {:ok, %{"a" => 1}} = DSPyBridge.call(w, "echo", %{a: 1})
    end

    test "env: reaches the worker; on_start runs with the worker before start_link returns" do
      me = self()
      on_start = fn w -> send(me, {:on_start, w, DSPyBridge.call(w, "ping", %{})}) end
      env = [{"DSPY_BRIDGE_TEST_VAR", "42"}]
      w = start_worker!(env: env, on_start: on_start, args: ["--allow-module", "os"])
      assert_received {:on_start, ^w, {:ok, %{"pong" => true}}}

      assert {:ok, "42"} =
               DSPyBridge.call(w, "call", %{target: "os.getenv", args: ["DSPY_BRIDGE_TEST_VAR"]})

      assert {:error, {:on_start, :nope}} = Worker.start(on_start: fn _ -> {:error, :nope} end)
    end
  end

  describe "call" do
    setup do
      %{w: start_worker!(args: ["--diagnostics"])}
    end

    test "an unknown command is the worker's error", %{w: w} do
      assert {:error, %Error{type: "unknown_command", details: %{"command" => "nope"}}} =
               DSPyBridge.call(w, "nope", %{})
    end

    test "on a streaming command, call returns the result", %{w: w} do
      assert {:ok, nil} = DSPyBridge.call(w, "stream_count", %{n: 50})
      refute_received {:dspy_bridge, _, _}
    end

    test "a dead or unregistered worker is a worker_exit error, never an exit", %{w: w} do
      assert {:error, %Error{type: "worker_exit"}} = DSPyBridge.call(:no_such_worker, "ping", %{})

      assert {:error, %Error{type: "worker_exit"}} =
               DSPyBridge.async(:no_such_worker, "ping", %{})

      assert_raise Error, ~r/worker_exit/, fn ->
        Enum.to_list(DSPyBridge.stream(:no_such_worker, "ping"))
      end

      GenServer.stop(w)
      assert {:error, %Error{type: "worker_exit"}} = DSPyBridge.call(w, "ping", %{})
    end

    test "an unknown option raises ArgumentError", %{w: w} do
      assert_raise ArgumentError, fn -> DSPyBridge.call(w, "ping", %{}, tiemout: 5) end
    end
  end
end
