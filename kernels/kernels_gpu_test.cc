// The CUDA kernels against the host reference, on a real device. Every test
// skips when kvx was built without the toolkit or no device is visible, so the
// target builds and passes everywhere; kernels/gpu_check.sh runs it on a GPU.

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <memory>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/device.h"
#include "kernels/heads.h"
#include "kernels/launch.h"
#include "kernels/staging.h"
#include "kernels/test_cases.h"
#include "testing/random_fragments.h"
#include "testing/status_matchers.h"

namespace kvx::kernels {
namespace {

using ::kvx::testing::IsOk;
using ::kvx::testing::StatusIs;

constexpr unsigned char kGuard = 0x3C;
constexpr int64_t kCapacity = 1 << 16;

class KernelsGpuTest : public SeededTest {
 protected:
  void SetUp() override {
    const absl::StatusOr<int> devices = CudaDeviceCount();
    if (!devices.ok() || *devices == 0) {
      GTEST_SKIP() << "no CUDA device: "
                   << (devices.ok() ? "device_count=0" : devices.status().ToString());
    }
    absl::StatusOr<std::unique_ptr<DeviceWorkspace>> workspace =
        DeviceWorkspace::Create(kCapacity);
    ASSERT_THAT(workspace, IsOk());
    workspace_ = std::move(*workspace);
  }

  Launch Gpu() const { return Launch::Cuda(workspace_.get()); }

  // A device copy of `host`.
  static DeviceBuffer ToDevice(const std::vector<unsigned char>& host) {
    DeviceBuffer buffer = DeviceBuffer::Create(host.size()).value();
    EXPECT_THAT(buffer.CopyFromHost(0, host), IsOk());
    return buffer;
  }
  static std::vector<unsigned char> ToHost(const DeviceBuffer& device) {
    std::vector<unsigned char> host(device.bytes());
    EXPECT_THAT(device.CopyToHost(0, absl::MakeSpan(host)), IsOk());
    return host;
  }

  std::unique_ptr<DeviceWorkspace> workspace_;
};

unsigned char* At(const DeviceBuffer& buffer, uint64_t offset) {
  return static_cast<unsigned char*>(buffer.data()) + offset;
}

// Random lists of every shape (1 byte to 64 KiB, any alignment, 16-byte aligned
// lists) gathered and scattered at random staging offsets; the same calls on
// host copies give the expected bytes, guards included.
TEST_F(KernelsGpuTest, GatherAndScatterMatchTheHostReference) {
  for (int iteration = 0; iteration < 64; ++iteration) {
    const FragmentShape& shape = ShapeOf(iteration);
    SCOPED_TRACE(Trace(iteration, shape));
    const ::kvx::testing::FragmentLayout layout = ::kvx::testing::RandomFragmentLayout(
        rng_, shape.max_fragment, 16 * shape.max_fragment + 64, shape.alignment);
    std::vector<unsigned char> src(layout.src_bytes);
    ::kvx::testing::FillRandom(rng_, absl::MakeSpan(src));
    const DeviceBuffer device_src = ToDevice(src);
    std::vector<SrcFragment> host_sources;
    std::vector<SrcFragment> device_sources;
    uint64_t total = 0;
    for (const auto& f : layout.fragments) {
      host_sources.push_back({src.data() + f.src_offset, f.length});
      device_sources.push_back({At(device_src, f.src_offset), f.length});
      total += f.length;
    }
    const uint64_t offset = std::uniform_int_distribution<uint64_t>(0, 40)(rng_);
    std::vector<unsigned char> expected(offset + total + 23, kGuard);
    ASSERT_THAT(Gather(Launch::Host(), host_sources, {expected.data(), expected.size()}, offset),
                IsOk());
    const DeviceBuffer staging = ToDevice(std::vector<unsigned char>(expected.size(), kGuard));
    ASSERT_THAT(Gather(Gpu(), device_sources, {staging.data(), staging.bytes()}, offset), IsOk());
    ASSERT_THAT(Wait(Gpu()), IsOk());
    ASSERT_EQ(FirstDifference(ToHost(staging), expected), "");

    std::vector<unsigned char> dst(layout.dst_bytes, kGuard);
    const DeviceBuffer device_dst = ToDevice(dst);
    std::vector<DstFragment> host_targets;
    std::vector<DstFragment> device_targets;
    for (const auto& f : layout.fragments) {
      host_targets.push_back({dst.data() + f.dst_offset, f.length});
      device_targets.push_back({At(device_dst, f.dst_offset), f.length});
    }
    ASSERT_THAT(Scatter(Launch::Host(), {expected.data(), expected.size()}, offset, host_targets),
                IsOk());
    ASSERT_THAT(Scatter(Gpu(), {staging.data(), staging.bytes()}, offset, device_targets), IsOk());
    ASSERT_THAT(Wait(Gpu()), IsOk());
    ASSERT_EQ(FirstDifference(ToHost(device_dst), dst), "");
  }
}

// One 5 MiB fragment (320 chunks, one thread block each) between 1-byte ones.
TEST_F(KernelsGpuTest, LargeFragmentBetweenSingleBytes) {
  std::vector<unsigned char> src((5 << 20) + 2);
  ::kvx::testing::FillRandom(rng_, absl::MakeSpan(src));
  const DeviceBuffer device_src = ToDevice(src);
  const SrcFragment host_sources[] = {{&src[0], 1}, {&src[1], 5 << 20}, {&src.back(), 1}};
  const SrcFragment device_sources[] = {
      {At(device_src, 0), 1}, {At(device_src, 1), 5 << 20}, {At(device_src, src.size() - 1), 1}};
  std::vector<unsigned char> expected(src.size() + 3, kGuard);
  ASSERT_THAT(Gather(Launch::Host(), host_sources, {expected.data(), expected.size()}, 3),
              IsOk());
  const DeviceBuffer staging = ToDevice(std::vector<unsigned char>(expected.size(), kGuard));
  ASSERT_THAT(Gather(Gpu(), device_sources, {staging.data(), staging.bytes()}, 3), IsOk());
  ASSERT_THAT(Wait(Gpu()), IsOk());
  EXPECT_EQ(FirstDifference(ToHost(staging), expected), "");
}

// Calls queued back to back reuse the workspace: each waits for the previous
// launch before rewriting the pointer list, so every list arrives intact.
TEST_F(KernelsGpuTest, BackToBackLaunchesShareOneWorkspace) {
  constexpr int kLaunches = 8;
  constexpr uint64_t kFragment = 4096;
  constexpr uint64_t kPerLaunch = 256;
  std::vector<unsigned char> src(kLaunches * kPerLaunch * kFragment);
  ::kvx::testing::FillRandom(rng_, absl::MakeSpan(src));
  const DeviceBuffer device_src = ToDevice(src);
  const DeviceBuffer staging = ToDevice(std::vector<unsigned char>(src.size(), kGuard));
  std::vector<unsigned char> expected(src.size());
  std::vector<SrcFragment> list;
  for (int launch = 0; launch < kLaunches; ++launch) {
    // Launch l gathers its fragments in reverse order into its own range.
    list.clear();
    for (uint64_t i = 0; i < kPerLaunch; ++i) {
      const uint64_t from = (launch * kPerLaunch + kPerLaunch - 1 - i) * kFragment;
      list.push_back({At(device_src, from), kFragment});
      std::copy(src.begin() + from, src.begin() + from + kFragment,
                expected.begin() + (launch * kPerLaunch + i) * kFragment);
    }
    ASSERT_THAT(Gather(Gpu(), list, {staging.data(), staging.bytes()},
                       launch * kPerLaunch * kFragment),
                IsOk());
  }
  ASSERT_THAT(Wait(Gpu()), IsOk());
  EXPECT_EQ(FirstDifference(ToHost(staging), expected), "");
}

TEST_F(KernelsGpuTest, ListLongerThanTheWorkspaceIsRejected) {
  const DeviceBuffer buffer = DeviceBuffer::Create(kCapacity + 1).value();
  std::vector<SrcFragment> list(kCapacity + 1, SrcFragment{buffer.data(), 0});
  EXPECT_THAT(Gather(Gpu(), list, {buffer.data(), buffer.bytes()}, 0),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       ::testing::HasSubstr("entries=65537 capacity=65536")));
}

// Random head layouts split and concatenated on the device, compared with the
// host reference; the concat of the split gives back the blocks.
TEST_F(KernelsGpuTest, HeadSplitAndConcatMatchTheHostReference) {
  for (int iteration = 0; iteration < 200; ++iteration) {
    HeadShape shape = RandomHeadShape(rng_);
    // Realistic sizes now and then: 32 tokens of 128 bf16 elements per head.
    if (iteration % 4 == 0) {
      shape.layout.tokens_per_block = 32;
      shape.layout.head_size = 128;
      shape.layout.element_bytes = 2;
    }
    SCOPED_TRACE(::testing::Message() << "seed=" << seed_ << " iteration=" << iteration
                                      << " parts=" << shape.parts << " blocks=" << shape.blocks
                                      << " head_size=" << shape.layout.head_size);
    const uint64_t block_bytes = BlockBytes(shape.layout).value();
    const uint64_t part_bytes = shape.blocks * block_bytes / shape.parts;
    std::vector<unsigned char> pool(1 + shape.blocks * block_bytes);
    ::kvx::testing::FillRandom(rng_, absl::MakeSpan(pool));
    const DeviceBuffer device_pool = ToDevice(pool);
    std::vector<const void*> host_blocks;
    std::vector<const void*> device_blocks;
    for (int64_t b = shape.blocks - 1; b >= 0; --b) {
      host_blocks.push_back(pool.data() + 1 + b * block_bytes);
      device_blocks.push_back(At(device_pool, 1 + b * block_bytes));
    }
    std::vector<unsigned char> expected(5 + shape.parts * part_bytes, kGuard);
    const DeviceBuffer device_parts = ToDevice(expected);
    std::vector<void*> host_parts;
    std::vector<void*> device_part_list;
    for (int64_t p = 0; p < shape.parts; ++p) {
      host_parts.push_back(expected.data() + 5 + p * part_bytes);
      device_part_list.push_back(At(device_parts, 5 + p * part_bytes));
    }
    ASSERT_THAT(SplitHeads(Launch::Host(), shape.layout, host_blocks, host_parts), IsOk());
    ASSERT_THAT(SplitHeads(Gpu(), shape.layout, device_blocks, device_part_list), IsOk());
    ASSERT_THAT(Wait(Gpu()), IsOk());
    ASSERT_EQ(FirstDifference(ToHost(device_parts), expected), "");

    const DeviceBuffer device_back = ToDevice(std::vector<unsigned char>(pool.size(), kGuard));
    std::vector<const void*> sources(device_part_list.begin(), device_part_list.end());
    std::vector<void*> targets;
    for (int64_t b = shape.blocks - 1; b >= 0; --b) {
      targets.push_back(At(device_back, 1 + b * block_bytes));
    }
    ASSERT_THAT(ConcatHeads(Gpu(), shape.layout, sources, targets), IsOk());
    ASSERT_THAT(Wait(Gpu()), IsOk());
    std::vector<unsigned char> back = ToHost(device_back);
    back[0] = pool[0];
    ASSERT_EQ(FirstDifference(back, pool), "");
  }
}

}  // namespace
}  // namespace kvx::kernels
