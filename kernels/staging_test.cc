#include "kernels/staging.h"

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/launch.h"
#include "kernels/test_cases.h"
#include "testing/random_fragments.h"
#include "testing/status_matchers.h"

namespace kvx::kernels {
namespace {

using ::kvx::testing::FragmentLayout;
using ::kvx::testing::IsOk;
using ::kvx::testing::StatusIs;
using ::testing::HasSubstr;

constexpr unsigned char kGuard = 0xA5;

// A random fragment list over host buffers: sources at random offsets of `src`
// (overlapping, any alignment unless the layout is aligned), destinations
// disjoint in `dst` with guard gaps, in a random order.
struct HostCase {
  FragmentLayout layout;
  std::vector<unsigned char> src;
  std::vector<unsigned char> dst;
  uint64_t total = 0;

  std::vector<SrcFragment> Sources() const {
    std::vector<SrcFragment> out;
    for (const auto& f : layout.fragments) out.push_back({src.data() + f.src_offset, f.length});
    return out;
  }
  std::vector<DstFragment> Destinations() {
    std::vector<DstFragment> out;
    for (const auto& f : layout.fragments) out.push_back({dst.data() + f.dst_offset, f.length});
    return out;
  }
};

HostCase MakeCase(std::mt19937_64& rng, uint64_t max_fragment, uint64_t payload,
                  uint64_t alignment) {
  HostCase c;
  c.layout = ::kvx::testing::RandomFragmentLayout(rng, max_fragment, payload, alignment);
  c.src.resize(c.layout.src_bytes);
  ::kvx::testing::FillRandom(rng, absl::MakeSpan(c.src));
  c.dst.assign(c.layout.dst_bytes, kGuard);
  for (const auto& f : c.layout.fragments) c.total += f.length;
  return c;
}

using StagingPropertyTest = SeededTest;

// Gather against a byte-by-byte oracle: staging[offset + position of fragment i
// + j] is source byte j of fragment i, and every other staging byte is a guard.
TEST_F(StagingPropertyTest, GatherMatchesByteOracle) {
  for (int iteration = 0; iteration < 200; ++iteration) {
    const FragmentShape& shape = ShapeOf(iteration);
    SCOPED_TRACE(Trace(iteration, shape));
    HostCase c = MakeCase(rng_, shape.max_fragment, 8 * shape.max_fragment + 64, shape.alignment);
    const uint64_t offset = std::uniform_int_distribution<uint64_t>(0, 64)(rng_) *
                            (shape.alignment == 1 ? 1 : shape.alignment);
    std::vector<unsigned char> staging(offset + c.total + 37, kGuard);

    std::vector<unsigned char> expected = staging;
    uint64_t position = offset;
    for (const auto& f : c.layout.fragments) {
      for (uint64_t j = 0; j < f.length; ++j) expected[position++] = c.src[f.src_offset + j];
    }

    ASSERT_THAT(Gather(Launch::Host(), c.Sources(), {staging.data(), staging.size()}, offset),
                IsOk());
    ASSERT_EQ(FirstDifference(staging, expected), "");
  }
}

// Scatter against a byte oracle, then the round trip: gathering the scattered
// fragments gives back the staging bytes. Guard gaps between destinations stay.
TEST_F(StagingPropertyTest, ScatterMatchesByteOracleAndInvertsGather) {
  for (int iteration = 0; iteration < 200; ++iteration) {
    const FragmentShape& shape = ShapeOf(iteration);
    SCOPED_TRACE(Trace(iteration, shape));
    HostCase c = MakeCase(rng_, shape.max_fragment, 8 * shape.max_fragment + 64, shape.alignment);
    const uint64_t offset = std::uniform_int_distribution<uint64_t>(0, 64)(rng_);
    std::vector<unsigned char> staging(offset + c.total);
    ::kvx::testing::FillRandom(rng_, absl::MakeSpan(staging));

    std::vector<unsigned char> expected = c.dst;
    uint64_t position = offset;
    for (const auto& f : c.layout.fragments) {
      for (uint64_t j = 0; j < f.length; ++j) expected[f.dst_offset + j] = staging[position++];
    }

    ASSERT_THAT(Scatter(Launch::Host(), {staging.data(), staging.size()}, offset,
                        c.Destinations()),
                IsOk());
    ASSERT_EQ(FirstDifference(c.dst, expected), "");

    std::vector<SrcFragment> back;
    for (const DstFragment& f : c.Destinations()) back.push_back({f.data, f.bytes});
    std::vector<unsigned char> regathered(staging.size(), kGuard);
    ASSERT_THAT(Gather(Launch::Host(), back, {regathered.data(), regathered.size()}, offset),
                IsOk());
    ASSERT_TRUE(std::equal(regathered.begin() + offset, regathered.end(),
                           staging.begin() + offset));
  }
}

TEST(StagingTest, EmptyListAndEmptyFragmentsMoveNothing) {
  unsigned char source[4] = {1, 2, 3, 4};
  std::vector<unsigned char> staging(8, kGuard);
  const StagingBuffer buffer{staging.data(), staging.size()};
  EXPECT_THAT(Gather(Launch::Host(), {}, buffer, 8), IsOk());
  const SrcFragment fragments[] = {{source, 0}, {source + 1, 2}, {source, 0}};
  ASSERT_THAT(Gather(Launch::Host(), fragments, buffer, 3), IsOk());
  EXPECT_EQ(staging, (std::vector<unsigned char>{kGuard, kGuard, kGuard, 2, 3, kGuard, kGuard,
                                                 kGuard}));
}

// Every rejection names the numbers involved and writes nothing.
TEST(StagingTest, RejectsBadCallsWithoutWriting) {
  unsigned char source[16] = {};
  std::vector<unsigned char> staging(16, kGuard);
  const StagingBuffer buffer{staging.data(), staging.size()};
  const SrcFragment two[] = {{source, 8}, {source, 8}};
  const SrcFragment with_null[] = {{source, 4}, {nullptr, 4}};
  const SrcFragment huge[] = {{source, 8}, {source, UINT64_MAX - 8}};
  struct Row {
    const char* name;
    absl::Span<const SrcFragment> fragments;
    StagingBuffer staging;
    uint64_t offset;
    absl::StatusCode code;
    const char* message;
  } rows[] = {
      {"null staging", two, {nullptr, 16}, 0, absl::StatusCode::kInvalidArgument,
       "staging buffer is null: staging_bytes=16"},
      {"null fragment", with_null, buffer, 0, absl::StatusCode::kInvalidArgument,
       "gather: fragment is null: fragment=1 bytes=4"},
      {"sizes overflow", huge, buffer, 1, absl::StatusCode::kInvalidArgument,
       "staging end overflows 64 bits: fragment=1"},
      {"offset overflows", two, buffer, UINT64_MAX - 4, absl::StatusCode::kInvalidArgument,
       "overflows 64 bits: fragment=0"},
      {"staging too small", two, buffer, 1, absl::StatusCode::kOutOfRange,
       "offset=1 bytes=16 end=17 staging_bytes=16 fragments=2"},
      {"offset past the end", {}, buffer, 17, absl::StatusCode::kOutOfRange,
       "offset=17 bytes=0 end=17 staging_bytes=16"},
  };
  for (const Row& row : rows) {
    SCOPED_TRACE(row.name);
    EXPECT_THAT(Gather(Launch::Host(), row.fragments, row.staging, row.offset),
                StatusIs(row.code, HasSubstr(row.message)));
    EXPECT_EQ(staging, std::vector<unsigned char>(16, kGuard));
  }

  unsigned char target[8] = {};
  const DstFragment destinations[] = {{target, 8}, {nullptr, 0}};
  EXPECT_THAT(Scatter(Launch::Host(), buffer, 0, destinations),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("scatter: fragment is null: fragment=1 bytes=0")));
  EXPECT_THAT(target, ::testing::Each(0));
}

// A CUDA launch is checked like a host one, then needs the toolkit and a
// workspace; on a build without the toolkit it says so.
TEST(StagingTest, CudaLaunchWithoutWorkspaceOrToolkitIsRejected) {
  unsigned char source[4] = {};
  unsigned char staging[4] = {};
  const SrcFragment fragments[] = {{source, 4}};
  const absl::Status status =
      Gather(Launch::Cuda(nullptr), fragments, {staging, sizeof(staging)}, 0);
  if (BuiltWithCuda()) {
    EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument,
                                 HasSubstr("gather: backend=cuda needs a workspace")));
  } else {
    EXPECT_THAT(status, StatusIs(absl::StatusCode::kUnimplemented,
                                 HasSubstr("without the CUDA toolkit")));
  }
  // Argument errors come first on either build.
  EXPECT_THAT(Gather(Launch::Cuda(nullptr), fragments, {staging, 2}, 0),
              StatusIs(absl::StatusCode::kOutOfRange));
}

}  // namespace
}  // namespace kvx::kernels
