defmodule DSPyBridge.FaultyCodec do
  @moduledoc """
  `DSPyBridge.Msgpack`, except for requests whose args hold `"fault"`: `"iodata"` returns
  what no port takes, `"throw"` throws (for the codec: option's failure paths).
  """

  def pack!(%{"type" => "request", "args" => %{"fault" => "iodata"}}), do: [256]
  def pack!(%{"type" => "request", "args" => %{"fault" => "throw"}}), do: throw(:faulty_codec)
  def pack!(term), do: DSPyBridge.Msgpack.pack!(term)
  def unpack!(binary), do: DSPyBridge.Msgpack.unpack!(binary)
end
