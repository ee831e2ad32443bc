defmodule DSPyBridge.CountingCodec do
  @moduledoc "A codec that delegates to DSPyBridge.Msgpack and counts its calls (for the codec: option)."

  def pack!(term), do: count(:pack) && DSPyBridge.Msgpack.pack!(term)
  def unpack!(binary), do: count(:unpack) && DSPyBridge.Msgpack.unpack!(binary)

  def count(kind), do: :counters.add(counters(), index(kind), 1) || true
  def get(kind), do: :counters.get(counters(), index(kind))

  defp index(:pack), do: 1
  defp index(:unpack), do: 2

  defp counters do
    case :persistent_term.get(__MODULE__, nil) do
      nil -> tap(:counters.new(2, []), &:persistent_term.put(__MODULE__, &1))
      ref -> ref
    end
  end
end
