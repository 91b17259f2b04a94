// The control plane's costs, the yardsticks of the transceiver's per-request
// overhead: a ZeroMQ round trip between two control channels on 127.0.0.1 (one
// thread sends, polls the other channel, answers and polls back), and the codec
// time of a RequestData.
//
//   bazel run -c opt //transfer:control_channel_benchmark
//
// Args: bytes (payload of each direction of a round trip); groups x blocks (block
// ids per group of the RequestData, random ids below 2^20 like a large pool's).

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "benchmark/benchmark.h"
#include "transfer/control_channel.h"
#include "transfer/protocol.h"
#include "transfer/slice.h"

namespace kvx::transfer {
namespace {

// Polls `channel` until one message arrives; false after a second without one.
bool ReceiveOne(ControlChannel& channel, std::vector<ControlChannel::Incoming>* in) {
  in->clear();
  const absl::Time deadline = absl::Now() + absl::Seconds(1);
  while (in->empty() && absl::Now() < deadline) {
    if (!channel.Poll(deadline, in).ok()) return false;
  }
  return in->size() == 1;
}

void BM_RoundTrip(benchmark::State& state) {
  absl::StatusOr<std::unique_ptr<ControlChannel>> a = ControlChannel::Create({});
  absl::StatusOr<std::unique_ptr<ControlChannel>> b = ControlChannel::Create({});
  if (!a.ok() || !b.ok()) {
    state.SkipWithError("cannot create the control channels");
    return;
  }
  const std::string payload(state.range(0), 'x');
  const std::string& a_address = (*a)->address();
  const std::string& b_address = (*b)->address();
  std::vector<ControlChannel::Incoming> in;
  // Both connections come up outside the timed loop.
  const auto round_trip = [&] {
    return (*a)->Send(b_address, payload).ok() && ReceiveOne(**b, &in) &&
           (*b)->Send(a_address, payload).ok() && ReceiveOne(**a, &in);
  };
  if (!round_trip()) {
    state.SkipWithError("warm-up round trip failed");
    return;
  }
  for (auto _ : state) {
    if (!round_trip()) {
      state.SkipWithError("round trip failed");
      return;
    }
  }
  benchmark::DoNotOptimize(in);
  state.SetItemsProcessed(state.iterations());  // round trips
  state.SetBytesProcessed(state.iterations() * 2 * static_cast<int64_t>(payload.size()));
}
BENCHMARK(BM_RoundTrip)
    ->ArgName("bytes")
    ->RangeMultiplier(64)
    ->Range(64, 256 << 10)
    ->UseRealTime();

RequestData MakeRequestData(int64_t groups, int64_t blocks) {
  std::mt19937_64 random(7);
  RequestData data;
  data.unique_rid = 123456789;
  data.slice_id = 0;
  data.receiver_rank = 1;
  data.prompt_len = blocks * 16;
  data.token_end = data.prompt_len;
  data.is_last_slice = true;
  data.block_ids_per_group.assign(groups, BlockList(blocks));
  for (BlockList& list : data.block_ids_per_group) {
    for (int64_t& id : list) id = static_cast<int64_t>(random() % (1 << 20));
  }
  data.aux_slot = 3;
  return data;
}

void SetCounters(benchmark::State& state, size_t encoded_bytes) {
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(encoded_bytes));
  state.SetItemsProcessed(state.iterations() * state.range(0) * state.range(1));  // ids
}

void BM_EncodeRequestData(benchmark::State& state) {
  const Message message = MakeRequestData(state.range(0), state.range(1));
  size_t bytes = 0;
  for (auto _ : state) {
    std::string encoded = EncodeMessage(message);
    bytes = encoded.size();
    benchmark::DoNotOptimize(encoded);
  }
  SetCounters(state, bytes);
}
BENCHMARK(BM_EncodeRequestData)
    ->ArgsProduct({{1, 64}, {16, 4096}})
    ->ArgNames({"groups", "blocks"});

void BM_DecodeRequestData(benchmark::State& state) {
  const std::string encoded =
      EncodeMessage(MakeRequestData(state.range(0), state.range(1)));
  for (auto _ : state) {
    absl::StatusOr<Message> decoded = DecodeMessage(encoded);
    if (!decoded.ok()) {
      state.SkipWithError("decode failed");
      return;
    }
    benchmark::DoNotOptimize(decoded);
  }
  SetCounters(state, encoded.size());
}
BENCHMARK(BM_DecodeRequestData)
    ->ArgsProduct({{1, 64}, {16, 4096}})
    ->ArgNames({"groups", "blocks"});

}  // namespace
}  // namespace kvx::transfer
