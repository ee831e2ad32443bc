defmodule DSPyBridge.Application do
  @moduledoc false
  use Application

  @impl true
  def start(_type, _args) do
    # :pg scope :dspy_bridge: pools' workers ({:pool, name}) and sessions ({:session, id})
    children = [
      {Task.Supervisor, name: DSPyBridge.TaskSupervisor},
      %{id: :pg, start: {:pg, :start_link, [:dspy_bridge]}}
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: DSPyBridge.Supervisor)
  end
end
