defmodule DSPyBridge.MsgpackTest do
  use ExUnit.Case, async: true

  import Bitwise
  alias DSPyBridge.Msgpack
  alias DSPyBridge.Msgpack.Bin
  import DSPyBridge.TestHelpers

  @seed 20_261_203

  describe "in process" do
    test "the boundaries of every int width round-trip" do
      for i <-
            [0, 127, 128, 255, 256, 65_535, 65_536, 4_294_967_295, 4_294_967_296] ++
              [18_446_744_073_709_551_615, -1, -32, -33, -128, -129, -32_768, -32_769] ++
              [-2_147_483_648, -2_147_483_649, -9_223_372_036_854_775_808] do
        assert Msgpack.unpack!(IO.iodata_to_binary(Msgpack.pack!(i))) === i
      end
    end

    test "str and bin headers at every length class" do
      for n <- [0, 31, 32, 255, 256, 65_535, 65_536] do
        s = String.duplicate("a", n)
        assert s |> Msgpack.pack!() |> IO.iodata_to_binary() |> Msgpack.unpack!() == s
        b = %Bin{data: s}
        assert <<c, _::binary>> = IO.iodata_to_binary(Msgpack.pack!(b))
        assert c in [0xC4, 0xC5, 0xC6]
      end
    end

    test "a binary goes out as str exactly when it is UTF-8 by String.valid?/1" do
      :rand.seed(:exsss, @seed)

      edge_cases = [
        "",
        "é€𝄞",
        <<0xED, 0xA0, 0x80>>,
        <<0xC0, 0x80>>,
        <<0xE0, 0x80, 0x80>>,
        <<0xF4, 0x90, 0x80, 0x80>>,
        <<0xF4, 0x8F, 0xBF, 0xBF>>,
        <<0xEF, 0xBF, 0xBE>>,
        <<0xE2, 0x82>>,
        <<0xF8, 0x88, 0x80, 0x80, 0x80>>,
        "abc" <> <<0x80>>
      ]

      random = for _ <- 1..20_000, do: :crypto.strong_rand_bytes(:rand.uniform(6))

      for b <- edge_cases ++ random do
        <<type, _::binary>> = IO.iodata_to_binary(Msgpack.pack!(b))
        assert (type in 0xA0..0xBF or type == 0xD9) == String.valid?(b), inspect(b)
      end
    end

    test "atoms go out as strings, nil/true/false as themselves" do
      assert roundtrip(%{n: 3, k: :v, x: [nil, true, false]}) ==
               %{"n" => 3, "k" => "v", "x" => [nil, true, false]}
    end

    test "NaN and the infinities decode to atoms" do
      assert Msgpack.unpack!(<<0xCB, 0x7FF8000000000000::64>>) == :nan
      assert Msgpack.unpack!(<<0xCB, 0x7FF0000000000000::64>>) == :infinity
      assert Msgpack.unpack!(<<0xCB, 0xFFF0000000000000::64>>) == :neg_infinity
      assert Msgpack.unpack!(<<0xCA, 0x7FC00000::32>>) == :nan
      assert Msgpack.unpack!(<<0xCA, 1.5::float-32>>) == 1.5
    end

    test "terms msgpack cannot carry raise ArgumentError" do
      for bad <- [
            {1, 2},
            self(),
            make_ref(),
            fn -> 1 end,
            %{a: {1}},
            [1, {2}],
            1 <<< 64,
            -(1 <<< 63) - 1
          ] do
        assert_raise ArgumentError, fn -> Msgpack.pack!(bad) end
      end

      assert_raise ArgumentError, fn -> Msgpack.pack!(URI.parse("http://x")) end
    end

    test "truncated and trailing input raise ArgumentError" do
      assert_raise ArgumentError, fn -> Msgpack.unpack!(<<0x92, 1>>) end
      # a truncated fixstr, as a value and as a map key, is named as such
      assert_raise ArgumentError, ~r/truncated/, fn -> Msgpack.unpack!(<<0xA3, ?a>>) end
      assert_raise ArgumentError, ~r/truncated/, fn -> Msgpack.unpack!(<<0x81, 0xA3, ?a>>) end
      assert_raise ArgumentError, fn -> Msgpack.unpack!(<<1, 2>>) end
      assert_raise ArgumentError, fn -> Msgpack.unpack!(<<0xC1>>) end
    end
  end

  describe "against the worker's echo" do
    setup do
      %{w: start_worker!()}
    end

    test "3,000 generated terms of every protocol type come back equal", %{w: w} do
      :rand.seed(:exsss, @seed)

      for i <- 1..3000 do
        term = gen(3)
        assert {:ok, %{"v" => back}} = DSPyBridge.call(w, "echo", %{"v" => term})
        assert back === normal(term), "term #{i}: #{inspect(term)}"
      end
    end

    test "invalid UTF-8 goes out as bin and comes back as the same bytes; Bin forces bin", %{w: w} do
      bytes = <<0xFF, 0xFE, ?a, 0>>
      assert <<0xC4, 4, ^bytes::binary>> = IO.iodata_to_binary(Msgpack.pack!(bytes))

      assert {:ok, %{"b" => ^bytes, "f" => "text"}} =
               DSPyBridge.call(w, "echo", %{b: bytes, f: %Bin{data: "text"}})
    end

    test "a term the codec refuses raises in the caller, nothing is sent, nothing stays registered",
         %{w: w} do
      assert_raise ArgumentError, fn -> DSPyBridge.call(w, "echo", %{t: {1, 2}}) end
      {:ok, stats} = DSPyBridge.call(w, "stats", %{})
      assert stats["requests"]["echo"] == nil
      # the caller registers before it encodes: the refused request is forgotten again
      assert nothing_registered?(w)
    end
  end

  defp roundtrip(term), do: term |> Msgpack.pack!() |> IO.iodata_to_binary() |> Msgpack.unpack!()

  # Atom-free terms; floats compare with ===, so they are kept distinct from ints.
  defp gen(0), do: scalar()

  defp gen(depth) do
    case :rand.uniform(10) do
      n when n <= 6 -> scalar()
      n when n <= 8 -> for _ <- 1..:rand.uniform(5)//1, do: gen(depth - 1)
      _ -> Map.new(1..:rand.uniform(4)//1, fn _ -> {key(), gen(depth - 1)} end)
    end
  end

  defp scalar do
    case :rand.uniform(11) do
      1 -> nil
      2 -> :rand.uniform(2) == 1
      3 -> :rand.uniform(128) - 33
      4 -> :rand.uniform(1 <<< 64) - 1
      5 -> -:rand.uniform(1 <<< 63)
      6 -> (:rand.uniform() - 0.5) * :math.pow(10, :rand.uniform(600) - 300)
      7 -> utf8(:rand.uniform(40))
      8 -> utf8(:rand.uniform(300))
      9 -> <<0xFF>> <> :crypto.strong_rand_bytes(:rand.uniform(20))
      10 -> %Bin{data: utf8(:rand.uniform(10))}
      11 -> Enum.random([0, 255, 256, 65_535, 65_536, 4_294_967_296, -129, -32_769])
    end
  end

  defp key do
    case :rand.uniform(4) do
      1 -> utf8(:rand.uniform(8))
      2 -> :rand.uniform(1000) - 500
      3 -> <<0xFE>> <> utf8(3)
      4 -> nil
    end
  end

  defp utf8(n) do
    chars = ~c"abcxyz 019_-" ++ [0xE9, 0x4E2D, 0x1F600, 0]
    for _ <- 1..n, into: "", do: <<Enum.random(chars)::utf8>>
  end

  # What a term looks like after the round trip: Bin structs are plain binaries.
  defp normal(%Bin{data: d}), do: d
  defp normal(list) when is_list(list), do: Enum.map(list, &normal/1)
  defp normal(map) when is_map(map), do: Map.new(map, fn {k, v} -> {normal(k), normal(v)} end)
  defp normal(other), do: other
end
