defmodule DSPyBridge.TelemetryTest do
  # not async: it loads a :telemetry module, which every worker started later uses
  use ExUnit.Case, async: false

  import DSPyBridge.TestHelpers
  alias DSPyBridge.Error

  test "events go to telemetry_handler without :telemetry, and to attached handlers once it is loaded" do
    me = self()

    handler = fn name, measurements, metadata ->
      send(me, {:event, name, measurements, metadata})
    end

    w = start_worker!(args: ["--diagnostics"], telemetry_handler: handler)

    {:ok, nil} = DSPyBridge.call(w, "stream_count", %{n: 2}, telemetry: true, session_id: "t1")

    assert_received {:event, [:dspy_bridge, :request, :start], %{queue_ms: _},
                     %{command: "stream_count", session_id: "t1"}}

    assert_received {:event, [:dspy_bridge, :request, :stop], %{duration_ms: _, chunks: 2},
                     %{request_id: id, worker: ^w}}

    refute_received {:event, [:dspy_bridge, :request, :stop], _, _}

    # :stop and :exception come from the terminal frame's meta, also without telemetry: true
    {:error, %Error{}} = DSPyBridge.call(w, "sleep", %{seconds: "x"})

    assert_received {:event, [:dspy_bridge, :request, :exception], %{},
                     %{command: "sleep", error_type: "bad_request"}}

    refute_received {:event, [:dspy_bridge, :request, :start], _, _}
    assert is_integer(id)

    Code.require_file("test/support/fake_telemetry.exs")

    # through apply/3: :telemetry does not exist when this file is compiled
    on_stop = &send(me, {:attached, &1, &2, &3, &4})
    apply(:telemetry, :attach, ["test", [:dspy_bridge, :request, :stop], on_stop, :config])

    w2 = start_worker!(args: ["--diagnostics"], telemetry_handler: handler)
    {:ok, nil} = DSPyBridge.call(w2, "stream_count", %{n: 1}, telemetry: true)

    assert_received {:attached, [:dspy_bridge, :request, :stop], %{chunks: 1},
                     %{command: "stream_count"}, :config}

    refute_received {:event, _, _, _}
  end
end
