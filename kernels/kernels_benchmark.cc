// GB/s of the staging kernels, next to a plain copy of the same bytes in the
// same run, on both backends.
//
//   bazel run -c opt //kernels:kernels_benchmark                       # all
//   bazel run -c opt //kernels:kernels_benchmark -- --benchmark_filter=BM_Host
//
// Each benchmark body runs twice: BM_Cuda* on device memory (64 MiB per call,
// timed with CUDA events; an error without a device) and BM_Host* with the host
// reference (16 MiB per call, timed with the steady clock; runs everywhere).
// Gather and scatter move 4, 16 or 64 KiB fragments taken in a shuffled order
// (as blocks of a real block table are); head split and concat move
// Llama-70B-like blocks (80 layers, 32 tokens, head size 128, bf16); Memcpy is
// one cudaMemcpy device-to-device (or memcpy) of each byte count used. A CUDA
// call's time includes filling and uploading its pointer list, as a real call
// pays it. bytes_per_second counts each moved byte once.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <utility>
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

uint64_t BytesPerCall(Backend backend) {
  return backend == Backend::kCuda ? uint64_t{64} << 20 : uint64_t{16} << 20;
}

// Llama-70B-like blocks with `heads` KV heads per rank.
HeadLayout LlamaBlock(int64_t heads) {
  return HeadLayout{/*layers=*/80, heads, /*tokens_per_block=*/32, /*head_size=*/128,
                    /*element_bytes=*/2};
}

// As many whole blocks as fit in `budget` bytes (at least one).
int64_t BlocksIn(uint64_t budget, const HeadLayout& layout) {
  return std::max<int64_t>(1, budget / BlockBytes(layout).value());
}

uint64_t HeadBytes(int64_t heads, Backend backend) {
  const HeadLayout layout = LlamaBlock(heads);
  return BlocksIn(BytesPerCall(backend), layout) * BlockBytes(layout).value();
}

// 0 .. slots - 1 in a shuffled order.
std::vector<uint64_t> ShuffledSlots(uint64_t slots) {
  std::vector<uint64_t> order(slots);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(7));
  return order;
}

// A source and a destination buffer, a launch and a clock for one backend.
class Rig {
 public:
  static absl::StatusOr<std::unique_ptr<Rig>> Create(Backend backend, uint64_t bytes,
                                                     int64_t capacity) {
    auto rig = std::unique_ptr<Rig>(new Rig(backend));
    if (backend == Backend::kHost) {
      rig->host_src_.assign(bytes, 1);
      rig->host_dst_.assign(bytes, 2);
      rig->src_ = rig->host_src_.data();
      rig->dst_ = rig->host_dst_.data();
      return rig;
    }
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
    rig->device_src_ = *std::move(src);
    rig->device_dst_ = *std::move(dst);
    rig->workspace_ = *std::move(workspace);
    rig->timer_ = *std::move(timer);
    rig->src_ = static_cast<unsigned char*>(rig->device_src_->data());
    rig->dst_ = static_cast<unsigned char*>(rig->device_dst_->data());
    return rig;
  }

  unsigned char* src() const { return src_; }
  unsigned char* dst() const { return dst_; }
  Launch launch() const {
    return backend_ == Backend::kHost ? Launch::Host() : Launch::Cuda(workspace_.get());
  }

  // The plain copy the kernels are measured against.
  absl::Status Copy(uint64_t bytes) const {
    if (backend_ == Backend::kHost) {
      std::memcpy(dst_, src_, bytes);
      return absl::OkStatus();
    }
    return CopyAsync(CudaStream(), dst_, src_, bytes);
  }

  // Runs `call` once untimed (page faults, module loading), then once per
  // iteration under the backend's clock.
  template <typename Call>
  void Run(benchmark::State& state, Call call) {
    absl::Status status = call();
    if (status.ok()) status = Wait(launch());
    for (auto _ : state) {
      if (!status.ok()) break;
      absl::StatusOr<double> seconds = TimeOnce(call);
      status = seconds.status();
      if (status.ok()) state.SetIterationTime(*seconds);
      benchmark::ClobberMemory();
    }
    if (!status.ok()) state.SkipWithError(status.ToString().c_str());
  }

 private:
  explicit Rig(Backend backend) : backend_(backend) {}

  template <typename Call>
  absl::StatusOr<double> TimeOnce(Call call) {
    if (backend_ == Backend::kHost) {
      const auto start = std::chrono::steady_clock::now();
      absl::Status status = call();
      if (!status.ok()) return status;
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    absl::Status status = timer_->Start(CudaStream());
    if (status.ok()) status = call();
    if (status.ok()) status = timer_->Stop(CudaStream());
    if (!status.ok()) return status;
    return timer_->ElapsedSeconds();
  }

  Backend backend_;
  unsigned char* src_ = nullptr;
  unsigned char* dst_ = nullptr;
  std::vector<unsigned char> host_src_;
  std::vector<unsigned char> host_dst_;
  std::optional<DeviceBuffer> device_src_;
  std::optional<DeviceBuffer> device_dst_;
  std::unique_ptr<DeviceWorkspace> workspace_;
  std::optional<DeviceTimer> timer_;
};

std::unique_ptr<Rig> CreateRig(benchmark::State& state, Backend backend, uint64_t bytes,
                               int64_t capacity) {
  absl::StatusOr<std::unique_ptr<Rig>> rig = Rig::Create(backend, bytes, capacity);
  if (!rig.ok()) {
    state.SkipWithError(rig.status().ToString().c_str());
    return nullptr;
  }
  return *std::move(rig);
}

void Report(benchmark::State& state, uint64_t bytes, uint64_t items) {
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * items));
}

// Fragments of state.range(0) bytes: the source's slots in a shuffled order
// gathered into the destination as staging, or the source as staging scattered
// to the destination's slots in a shuffled order.
template <Backend kBackend, bool kGather>
void BM_Staging(benchmark::State& state) {
  const uint64_t bytes = BytesPerCall(kBackend);
  const uint64_t fragment = state.range(0);
  const uint64_t count = bytes / fragment;
  std::unique_ptr<Rig> rig = CreateRig(state, kBackend, bytes, count);
  if (rig == nullptr) return;
  std::vector<SrcFragment> sources;
  std::vector<DstFragment> targets;
  for (uint64_t slot : ShuffledSlots(count)) {
    sources.push_back({rig->src() + slot * fragment, fragment});
    targets.push_back({rig->dst() + slot * fragment, fragment});
  }
  rig->Run(state, [&] {
    return kGather ? Gather(rig->launch(), sources, {rig->dst(), bytes}, 0)
                   : Scatter(rig->launch(), {rig->src(), bytes}, 0, targets);
  });
  Report(state, bytes, count);
}

// Blocks (shuffled in the source) with state.range(0) heads split into
// state.range(1) parts in the destination, or concatenated back from them.
template <Backend kBackend, bool kSplit>
void BM_Heads(benchmark::State& state) {
  const HeadLayout layout = LlamaBlock(state.range(0));
  const int64_t parts = state.range(1);
  const uint64_t block_bytes = BlockBytes(layout).value();
  const int64_t blocks = BlocksIn(BytesPerCall(kBackend), layout);
  const uint64_t total = blocks * block_bytes;
  std::unique_ptr<Rig> rig = CreateRig(state, kBackend, total, blocks + parts);
  if (rig == nullptr) return;
  std::vector<const void*> blocks_in;
  std::vector<void*> blocks_out;
  for (uint64_t slot : ShuffledSlots(blocks)) {
    blocks_in.push_back(rig->src() + slot * block_bytes);
    blocks_out.push_back(rig->src() + slot * block_bytes);
  }
  std::vector<const void*> parts_in;
  std::vector<void*> parts_out;
  for (int64_t p = 0; p < parts; ++p) {
    parts_in.push_back(rig->dst() + p * (total / parts));
    parts_out.push_back(rig->dst() + p * (total / parts));
  }
  rig->Run(state, [&] {
    return kSplit ? SplitHeads(rig->launch(), layout, blocks_in, parts_out)
                  : ConcatHeads(rig->launch(), layout, parts_in, blocks_out);
  });
  Report(state, total, blocks * layout.layers * 2 * parts);
}

// One plain copy of state.range(0) bytes.
template <Backend kBackend>
void BM_Memcpy(benchmark::State& state) {
  const uint64_t bytes = state.range(0);
  std::unique_ptr<Rig> rig = CreateRig(state, kBackend, bytes, 1);
  if (rig == nullptr) return;
  rig->Run(state, [&] { return rig->Copy(bytes); });
  Report(state, bytes, 1);
}

struct Body {
  const char* kernel;
  void (*function)(benchmark::State&);
};

// Registers every benchmark for one backend as <prefix><kernel>.
template <Backend kBackend>
void Register(const char* prefix) {
  auto name = [prefix](const char* kernel) { return std::string(prefix) + kernel; };
  const benchmark::TimeUnit unit = benchmark::kMicrosecond;
  for (const Body& body : {Body{"Gather", &BM_Staging<kBackend, true>},
                           Body{"Scatter", &BM_Staging<kBackend, false>}}) {
    benchmark::RegisterBenchmark(name(body.kernel).c_str(), body.function)
        ->ArgName("fragment_bytes")->Arg(4096)->Arg(16384)->Arg(65536)
        ->UseManualTime()->Unit(unit);
  }
  // TP4 -> TP8 (2 heads, 2 parts), TP1 -> TP8 (8 heads, 8 parts), TP1 -> TP4.
  for (const Body& body : {Body{"SplitHeads", &BM_Heads<kBackend, true>},
                           Body{"ConcatHeads", &BM_Heads<kBackend, false>}}) {
    benchmark::RegisterBenchmark(name(body.kernel).c_str(), body.function)
        ->ArgNames({"heads", "parts"})->Args({2, 2})->Args({8, 8})->Args({8, 4})
        ->UseManualTime()->Unit(unit);
  }
  benchmark::RegisterBenchmark(name(kBackend == Backend::kCuda ? "MemcpyD2D" : "Memcpy").c_str(),
                               BM_Memcpy<kBackend>)
      ->ArgName("bytes")->Arg(BytesPerCall(kBackend))->Arg(HeadBytes(2, kBackend))
      ->Arg(HeadBytes(8, kBackend))->UseManualTime()->Unit(unit);
}

}  // namespace
}  // namespace kvx::kernels

int main(int argc, char** argv) {
  kvx::kernels::Register<kvx::kernels::Backend::kCuda>("BM_Cuda");
  kvx::kernels::Register<kvx::kernels::Backend::kHost>("BM_Host");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
