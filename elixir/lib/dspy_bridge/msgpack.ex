defmodule DSPyBridge.Msgpack do
  @moduledoc """
  The MessagePack codec the library uses by default (no Hex dependency).

  Encoding:

    * a binary that is valid UTF-8 is a msgpack str, any other binary a bin;
      `%DSPyBridge.Msgpack.Bin{data: binary}` forces bin;
    * `nil`, `true`, `false` are themselves; any other atom is a str of its name;
    * integers from -2^63 to 2^64-1; floats as float64;
    * lists are arrays, maps are maps (keys encoded like values);
    * anything else (tuples, pids, refs, functions, structs, larger integers)
      raises `ArgumentError` before a byte is produced.

  Decoding: str and bin both become binaries, map keys stay as they were sent
  (strings from the worker), and NaN, +Inf and -Inf floats become `:nan`,
  `:infinity` and `:neg_infinity` (the BEAM has no such floats).

  Any module with `pack!/1` (returning iodata) and `unpack!/1` can replace this
  one through the worker's `codec:` option, for example `Msgpax`.
  """

  defmodule Bin do
    @moduledoc "Wraps a binary that must go out as msgpack bin, even if it is valid UTF-8."
    @enforce_keys [:data]
    defstruct [:data]
    @type t :: %__MODULE__{data: binary}
  end

  @typedoc "A term this codec can encode."
  @type encodable ::
          nil
          | boolean
          | atom
          | integer
          | float
          | binary
          | Bin.t()
          | [encodable]
          | %{optional(encodable) => encodable}

  @doc "Encodes `term` as iodata; raises `ArgumentError` for a term msgpack cannot carry."
  @spec pack!(encodable) :: iodata
  def pack!(term), do: enc(term)

  @doc "Decodes exactly one msgpack value from `binary`; raises `ArgumentError` otherwise."
  @spec unpack!(binary) :: term
  def unpack!(binary) when is_binary(binary) do
    case dec(binary) do
      {value, ""} -> value
      {_, rest} -> raise ArgumentError, "msgpack: #{byte_size(rest)} bytes after the value"
    end
  rescue
    e in MatchError ->
      raise ArgumentError, "msgpack: truncated or invalid input (#{inspect(e.term)})"
  end

  # ---- encoding ------------------------------------------------------------------

  defp enc(nil), do: <<0xC0>>
  defp enc(false), do: <<0xC2>>
  defp enc(true), do: <<0xC3>>
  defp enc(%Bin{data: data}) when is_binary(data), do: enc_bin(data)
  defp enc(atom) when is_atom(atom), do: enc_str(Atom.to_string(atom))
  defp enc(int) when is_integer(int), do: enc_int(int)
  defp enc(float) when is_float(float), do: <<0xCB, float::float-64>>

  # The BIF, not `String.valid?/1`, which walks a binary one code point per call (4x slower);
  # both accept exactly the same binaries (surrogates and overlong forms are not UTF-8).
  defp enc(binary) when is_binary(binary) do
    if is_binary(:unicode.characters_to_binary(binary)),
      do: enc_str(binary),
      else: enc_bin(binary)
  end

  defp enc(list) when is_list(list),
    do: [header(length(list), 0x90, 0xDC, 0xDD) | Enum.map(list, &enc/1)]

  defp enc(map) when is_map(map) and not is_struct(map) do
    [header(map_size(map), 0x80, 0xDE, 0xDF) | :maps.fold(&[enc(&1), enc(&2) | &3], [], map)]
  end

  defp enc(other), do: raise(ArgumentError, "msgpack cannot encode #{inspect(other)}")

  defp enc_int(i) when i in 0..127, do: <<i>>
  defp enc_int(i) when i in -32..-1, do: <<i::signed-8>>
  defp enc_int(i) when i in 0..0xFF, do: <<0xCC, i>>
  defp enc_int(i) when i in 0..0xFFFF, do: <<0xCD, i::16>>
  defp enc_int(i) when i in 0..0xFFFFFFFF, do: <<0xCE, i::32>>
  defp enc_int(i) when i in 0..0xFFFFFFFFFFFFFFFF, do: <<0xCF, i::64>>
  defp enc_int(i) when i in -0x80..-1, do: <<0xD0, i::signed-8>>
  defp enc_int(i) when i in -0x8000..-1, do: <<0xD1, i::signed-16>>
  defp enc_int(i) when i in -0x80000000..-1, do: <<0xD2, i::signed-32>>
  defp enc_int(i) when i in -0x8000000000000000..-1, do: <<0xD3, i::signed-64>>

  defp enc_int(i),
    do: raise(ArgumentError, "msgpack cannot encode #{i}: integers are at most 64 bits")

  defp enc_str(s) do
    case byte_size(s) do
      n when n < 32 -> [<<0xA0 + n>>, s]
      n when n < 0x100 -> [<<0xD9, n>>, s]
      n when n < 0x10000 -> [<<0xDA, n::16>>, s]
      n when n < 0x100000000 -> [<<0xDB, n::32>>, s]
    end
  end

  defp enc_bin(b) do
    case byte_size(b) do
      n when n < 0x100 -> [<<0xC4, n>>, b]
      n when n < 0x10000 -> [<<0xC5, n::16>>, b]
      n when n < 0x100000000 -> [<<0xC6, n::32>>, b]
    end
  end

  defp header(n, fix, _, _) when n < 16, do: <<fix + n>>
  defp header(n, _, b16, _) when n < 0x10000, do: <<b16, n::16>>
  defp header(n, _, _, b32), do: <<b32, n::32>>

  # ---- decoding ------------------------------------------------------------------

  defp dec(<<0xC0, r::binary>>), do: {nil, r}
  defp dec(<<0xC2, r::binary>>), do: {false, r}
  defp dec(<<0xC3, r::binary>>), do: {true, r}
  defp dec(<<i, r::binary>>) when i < 0x80, do: {i, r}
  defp dec(<<i::signed-8, r::binary>>) when i >= -32, do: {i, r}
  defp dec(<<0xCC, i, r::binary>>), do: {i, r}
  defp dec(<<0xCD, i::16, r::binary>>), do: {i, r}
  defp dec(<<0xCE, i::32, r::binary>>), do: {i, r}
  defp dec(<<0xCF, i::64, r::binary>>), do: {i, r}
  defp dec(<<0xD0, i::signed-8, r::binary>>), do: {i, r}
  defp dec(<<0xD1, i::signed-16, r::binary>>), do: {i, r}
  defp dec(<<0xD2, i::signed-32, r::binary>>), do: {i, r}
  defp dec(<<0xD3, i::signed-64, r::binary>>), do: {i, r}
  defp dec(<<0xCA, f::binary-4, r::binary>>), do: {float32(f), r}
  defp dec(<<0xCB, f::binary-8, r::binary>>), do: {float64(f), r}
  # a whole fixstr in one match (most strings); a truncated one falls to `bytes/2`'s MatchError
  defp dec(<<0b101::3, n::5, s::binary-size(n), r::binary>>), do: {s, r}
  defp dec(<<s, r::binary>>) when s in 0xA0..0xBF, do: bytes(s - 0xA0, r)
  defp dec(<<c, n, r::binary>>) when c in [0xC4, 0xD9], do: bytes(n, r)
  defp dec(<<c, n::16, r::binary>>) when c in [0xC5, 0xDA], do: bytes(n, r)
  defp dec(<<c, n::32, r::binary>>) when c in [0xC6, 0xDB], do: bytes(n, r)
  defp dec(<<a, r::binary>>) when a in 0x90..0x9F, do: list(a - 0x90, r, [])
  defp dec(<<0xDC, n::16, r::binary>>), do: list(n, r, [])
  defp dec(<<0xDD, n::32, r::binary>>), do: list(n, r, [])
  defp dec(<<m, r::binary>>) when m in 0x80..0x8F, do: map(m - 0x80, r, [])
  defp dec(<<0xDE, n::16, r::binary>>), do: map(n, r, [])
  defp dec(<<0xDF, n::32, r::binary>>), do: map(n, r, [])

  defp dec(<<t, _::binary>>),
    do: raise(ArgumentError, "msgpack: unsupported type byte 0x#{Integer.to_string(t, 16)}")

  defp dec(<<>>), do: raise(ArgumentError, "msgpack: input ended inside a value")

  defp bytes(n, r) do
    <<b::binary-size(n), rest::binary>> = r
    {b, rest}
  end

  defp list(0, r, acc), do: {Enum.reverse(acc), r}

  defp list(n, r, acc) do
    {v, r} = dec(r)
    list(n - 1, r, [v | acc])
  end

  defp map(0, r, acc), do: {:maps.from_list(acc), r}

  # a fixstr key (every key the worker sends) without a call to `dec/1`
  defp map(n, <<0b101::3, len::5, k::binary-size(len), r::binary>>, acc) do
    {v, r} = dec(r)
    map(n - 1, r, [{k, v} | acc])
  end

  defp map(n, r, acc) do
    {k, r} = dec(r)
    {v, r} = dec(r)
    map(n - 1, r, [{k, v} | acc])
  end

  defp float64(<<0::1, 0x7FF::11, 0::52>>), do: :infinity
  defp float64(<<1::1, 0x7FF::11, 0::52>>), do: :neg_infinity
  defp float64(<<_::1, 0x7FF::11, _::52>>), do: :nan
  defp float64(<<f::float-64>>), do: f

  defp float32(<<0::1, 0xFF::8, 0::23>>), do: :infinity
  defp float32(<<1::1, 0xFF::8, 0::23>>), do: :neg_infinity
  defp float32(<<_::1, 0xFF::8, _::23>>), do: :nan
  defp float32(<<f::float-32>>), do: f
end
