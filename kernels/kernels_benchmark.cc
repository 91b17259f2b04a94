// GB/s of the staging kernels, next to a plain copy of the same bytes in the
// same run.
//
//   bazel run -c opt //kernels:kernels_benchmark                       # all
//   bazel run -c opt //kernels:kernels_benchmark -- --benchmark_filter=Host
//
// BM_Cuda*: the CUDA kernels on device memory, timed with CUDA events
// (UseManualTime): gather and scatter of 64 MiB in 4, 16 or 64 KiB fragments
// taken in a shuffled order (as blocks of a real block table are), head split
// and concat of Llama-70B-like blocks (80 layers, 32 tokens, head size 128,
// bf16), and cudaMemcpy device-to-device of each byte count. The event time
// includes filling and uploading the pointer list, as a real call pays it. They
// report an error (SkipWithError) without a device.
// BM_Host*: the host reference on 16 MiB, wall time, next to one memcpy; runs
// everywhere. bytes_per_second counts each moved byte once (read + write).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "benchmark/benchmark.h"
#include "kernels/device.h"
#include "kernels/heads.h"
#include "kernels/launch.h"
#include "kernels/staging.h"

namespace kvx::kernels {
namespace {

constexpr uint64_t kCudaBytes = uint64_t{64} << 20;
constexpr uint64_t kHostBytes = uint64_t{16} << 20;

// Llama-70B-like blocks with `heads` KV heads per rank.
HeadLayout LlamaBlock(int64_t heads) {
  return HeadLayout{/*layers=*/80, heads, /*tokens_per_block=*/32, /*head_size=*/128,
                    /*element_bytes=*/2};
}

// As many whole blocks as fit in `budget` bytes (at least one).
int64_t BlocksIn(uint64_t budget, const HeadLayout& layout) {
  return std::max<int64_t>(1, budget / BlockBytes(layout).value());
}

// Slot i of the source pool, in a shuffled order.
std::vector<uint64_t> ShuffledSlots(uint64_t slots) {
  std::vector<uint64_t> order(slots);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(7));
  return order;
}

void Report(benchmark::State& state, uint64_t bytes, uint64_t items) {
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * items));
}

// ---------------------------------------------------------------- CUDA ----

// Device memory and a timer for one CUDA benchmark, or the reason there is none.
struct CudaRig {
  static absl::StatusOr<std::unique_ptr<CudaRig>> Create(uint64_t bytes, int64_t capacity) {
    absl::StatusOr<int> devices = CudaDeviceCount();
    if (!devices.ok()) return devices.status();
    if (*devices == 0) return absl::UnavailableError("no CUDA device: device_count=0");
    absl::StatusOr<DeviceBuffer> src = DeviceBuffer::Create(bytes);
    if (!src.ok()) return src.status();
    absl::StatusOr<DeviceBuffer> dst = DeviceBuffer::Create(bytes);
    if (!dst.ok()) return dst.status();
    absl::StatusOr<std::unique_ptr<DeviceWorkspace>> workspace =
        DeviceWorkspace::Create(capacity);
    if (!workspace.ok()) return workspace.status();
    absl::StatusOr<DeviceTimer> timer = DeviceTimer::Create();
    if (!timer.ok()) return timer.status();
    return std::unique_ptr<CudaRig>(
        new CudaRig{*std::move(src), *std::move(dst), *std::move(workspace), *std::move(timer)});
  }

  unsigned char* src_at(uint64_t offset) const {
    return static_cast<unsigned char*>(src.data()) + offset;
  }
  unsigned char* dst_at(uint64_t offset) const {
    return static_cast<unsigned char*>(dst.data()) + offset;
  }
  Launch launch() const { return Launch::Cuda(workspace.get()); }

  // Runs `call` once untimed (module loading), then once per iteration between
  // the timer's events.
  template <typename Call>
  void Run(benchmark::State& state, Call call) {
    absl::Status warm_up = call();
    if (warm_up.ok()) warm_up = Wait(launch());
    if (!warm_up.ok()) {
      state.SkipWithError(warm_up.ToString().c_str());
      return;
    }
    for (auto _ : state) {
      absl::StatusOr<double> seconds = TimeOnce(call);
      if (!seconds.ok()) {
        state.SkipWithError(seconds.status().ToString().c_str());
        break;
      }
      state.SetIterationTime(*seconds);
    }
  }

  template <typename Call>
  absl::StatusOr<double> TimeOnce(Call call) {
    absl::Status status = timer.Start(CudaStream());
    if (status.ok()) status = call();
    if (status.ok()) status = timer.Stop(CudaStream());
    if (!status.ok()) return status;
    return timer.ElapsedSeconds();
  }

  DeviceBuffer src;
  DeviceBuffer dst;
  std::unique_ptr<DeviceWorkspace> workspace;
  DeviceTimer timer;
};

std::unique_ptr<CudaRig> CreateRig(benchmark::State& state, uint64_t bytes, int64_t capacity) {
  absl::StatusOr<std::unique_ptr<CudaRig>> rig = CudaRig::Create(bytes, capacity);
  if (!rig.ok()) {
    state.SkipWithError(rig.status().ToString().c_str());
    return nullptr;
  }
  return *std::move(rig);
}

// Fragments of state.range(0) bytes: the source pool's slots in a shuffled order
// gathered into staging (or staging scattered back to them).
void BM_CudaGather(benchmark::State& state) {
  const uint64_t fragment = state.range(0);
  const uint64_t count = kCudaBytes / fragment;
  std::unique_ptr<CudaRig> rig = CreateRig(state, kCudaBytes, count);
  if (rig == nullptr) return;
  std::vector<SrcFragment> list;
  for (uint64_t slot : ShuffledSlots(count)) list.push_back({rig->src_at(slot * fragment), fragment});
  rig->Run(state, [&] {
    return Gather(rig->launch(), list, {rig->dst.data(), kCudaBytes}, 0);
  });
  Report(state, kCudaBytes, count);
}

void BM_CudaScatter(benchmark::State& state) {
  const uint64_t fragment = state.range(0);
  const uint64_t count = kCudaBytes / fragment;
  std::unique_ptr<CudaRig> rig = CreateRig(state, kCudaBytes, count);
  if (rig == nullptr) return;
  std::vector<DstFragment> list;
  for (uint64_t slot : ShuffledSlots(count)) list.push_back({rig->dst_at(slot * fragment), fragment});
  rig->Run(state, [&] {
    return Scatter(rig->launch(), {rig->src.data(), kCudaBytes}, 0, list);
  });
  Report(state, kCudaBytes, count);
}

// Blocks with state.range(0) heads split into state.range(1) parts (or
// concatenated back). Runs are heads/parts heads of 8 KiB.
template <bool kSplit>
void BM_CudaHeads(benchmark::State& state) {
  const HeadLayout layout = LlamaBlock(state.range(0));
  const int64_t parts = state.range(1);
  const uint64_t block_bytes = BlockBytes(layout).value();
  const int64_t blocks = BlocksIn(kCudaBytes, layout);
  const uint64_t total = blocks * block_bytes;
  std::unique_ptr<CudaRig> rig = CreateRig(state, total, blocks + parts);
  if (rig == nullptr) return;
  std::vector<const void*> block_list;
  std::vector<void*> mutable_blocks;
  for (uint64_t slot : ShuffledSlots(blocks)) {
    block_list.push_back(rig->src_at(slot * block_bytes));
    mutable_blocks.push_back(rig->src_at(slot * block_bytes));
  }
  std::vector<const void*> part_list;
  std::vector<void*> mutable_parts;
  for (int64_t p = 0; p < parts; ++p) {
    part_list.push_back(rig->dst_at(p * (total / parts)));
    mutable_parts.push_back(rig->dst_at(p * (total / parts)));
  }
  rig->Run(state, [&] {
    return kSplit ? SplitHeads(rig->launch(), layout, block_list, mutable_parts)
                  : ConcatHeads(rig->launch(), layout, part_list, mutable_blocks);
  });
  Report(state, total, blocks * layout.layers * 2 * parts);
}

// One cudaMemcpy device-to-device of state.range(0) bytes.
void BM_CudaMemcpyD2D(benchmark::State& state) {
  const uint64_t bytes = state.range(0);
  std::unique_ptr<CudaRig> rig = CreateRig(state, bytes, 1);
  if (rig == nullptr) return;
  rig->Run(state, [&] { return CopyAsync(CudaStream(), rig->dst.data(), rig->src.data(), bytes); });
  Report(state, bytes, 1);
}

uint64_t HeadBytes(int64_t heads, uint64_t budget) {
  const HeadLayout layout = LlamaBlock(heads);
  return BlocksIn(budget, layout) * BlockBytes(layout).value();
}

BENCHMARK(BM_CudaGather)->ArgName("fragment_bytes")->Arg(4096)->Arg(16384)->Arg(65536)
    ->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaScatter)->ArgName("fragment_bytes")->Arg(4096)->Arg(16384)->Arg(65536)
    ->UseManualTime()->Unit(benchmark::kMicrosecond);
// TP4 -> TP8 (2 heads, 2 parts), TP1 -> TP8 (8 heads, 8 parts), TP1 -> TP4.
BENCHMARK_TEMPLATE(BM_CudaHeads, true)->Name("BM_CudaSplitHeads")->ArgNames({"heads", "parts"})
    ->Args({2, 2})->Args({8, 8})->Args({8, 4})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_CudaHeads, false)->Name("BM_CudaConcatHeads")->ArgNames({"heads", "parts"})
    ->Args({2, 2})->Args({8, 8})->Args({8, 4})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaMemcpyD2D)->ArgName("bytes")->Arg(kCudaBytes)->Arg(HeadBytes(2, kCudaBytes))
    ->Arg(HeadBytes(8, kCudaBytes))->UseManualTime()->Unit(benchmark::kMicrosecond);

// ---------------------------------------------------------------- host ----

void BM_HostGather(benchmark::State& state) {
  const uint64_t fragment = state.range(0);
  const uint64_t count = kHostBytes / fragment;
  std::vector<unsigned char> pool(kHostBytes, 1);
  std::vector<unsigned char> staging(kHostBytes);
  std::vector<SrcFragment> list;
  for (uint64_t slot : ShuffledSlots(count)) list.push_back({&pool[slot * fragment], fragment});
  for (auto _ : state) {
    absl::Status status = Gather(Launch::Host(), list, {staging.data(), staging.size()}, 0);
    if (!status.ok()) state.SkipWithError(status.ToString().c_str());
    benchmark::DoNotOptimize(staging.data());
    benchmark::ClobberMemory();
  }
  Report(state, kHostBytes, count);
}

void BM_HostScatter(benchmark::State& state) {
  const uint64_t fragment = state.range(0);
  const uint64_t count = kHostBytes / fragment;
  std::vector<unsigned char> pool(kHostBytes);
  std::vector<unsigned char> staging(kHostBytes, 1);
  std::vector<DstFragment> list;
  for (uint64_t slot : ShuffledSlots(count)) list.push_back({&pool[slot * fragment], fragment});
  for (auto _ : state) {
    absl::Status status = Scatter(Launch::Host(), {staging.data(), staging.size()}, 0, list);
    if (!status.ok()) state.SkipWithError(status.ToString().c_str());
    benchmark::DoNotOptimize(pool.data());
    benchmark::ClobberMemory();
  }
  Report(state, kHostBytes, count);
}

template <bool kSplit>
void BM_HostHeads(benchmark::State& state) {
  const HeadLayout layout = LlamaBlock(state.range(0));
  const int64_t parts = state.range(1);
  const uint64_t block_bytes = BlockBytes(layout).value();
  const int64_t blocks = BlocksIn(kHostBytes, layout);
  const uint64_t total = blocks * block_bytes;
  std::vector<unsigned char> pool(total, 1);
  std::vector<unsigned char> staging(total, 2);
  std::vector<const void*> blocks_in;
  std::vector<void*> blocks_out;
  for (uint64_t slot : ShuffledSlots(blocks)) {
    blocks_in.push_back(&pool[slot * block_bytes]);
    blocks_out.push_back(&pool[slot * block_bytes]);
  }
  std::vector<const void*> parts_in;
  std::vector<void*> parts_out;
  for (int64_t p = 0; p < parts; ++p) {
    parts_in.push_back(&staging[p * (total / parts)]);
    parts_out.push_back(&staging[p * (total / parts)]);
  }
  for (auto _ : state) {
    absl::Status status = kSplit ? SplitHeads(Launch::Host(), layout, blocks_in, parts_out)
                                 : ConcatHeads(Launch::Host(), layout, parts_in, blocks_out);
    if (!status.ok()) state.SkipWithError(status.ToString().c_str());
    benchmark::DoNotOptimize(pool.data());
    benchmark::DoNotOptimize(staging.data());
    benchmark::ClobberMemory();
  }
  Report(state, total, blocks * layout.layers * 2 * parts);
}

void BM_HostMemcpy(benchmark::State& state) {
  const uint64_t bytes = state.range(0);
  std::vector<unsigned char> src(bytes, 1);
  std::vector<unsigned char> dst(bytes);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  Report(state, bytes, 1);
}

BENCHMARK(BM_HostGather)->ArgName("fragment_bytes")->Arg(4096)->Arg(16384)->Arg(65536)
    ->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_HostScatter)->ArgName("fragment_bytes")->Arg(4096)->Arg(16384)->Arg(65536)
    ->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_HostHeads, true)->Name("BM_HostSplitHeads")->ArgNames({"heads", "parts"})
    ->Args({2, 2})->Args({8, 8})->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_HostHeads, false)->Name("BM_HostConcatHeads")
    ->ArgNames({"heads", "parts"})->Args({2, 2})->Args({8, 8})->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_HostMemcpy)->ArgName("bytes")->Arg(kHostBytes)->Arg(HeadBytes(2, kHostBytes))
    ->Arg(HeadBytes(8, kHostBytes))->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvx::kernels
