// The CUDA kernels' per-thread code (internal/copy_body.h), run on the CPU for
// every (block, thread) of a grid, against the host reference. Threads of these
// kernels never communicate, so this computes what the GPU computes; it checks
// the chunk walk, the binary search, the head arithmetic and each alignment path
// on machines without a GPU. kernels_gpu_test runs the real kernels.

#include "kernels/internal/copy_body.h"

#include <cstdint>
#include <iterator>
#include <random>
#include <vector>

#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "kernels/heads.h"
#include "kernels/internal/copy_kernels.h"
#include "kernels/launch.h"
#include "kernels/staging.h"
#include "kernels/test_cases.h"
#include "testing/random_fragments.h"
#include "testing/status_matchers.h"

namespace kvx::kernels_internal {
namespace {

using ::kvx::kernels::FirstDifference;
using ::kvx::kernels::FragmentShape;
using ::kvx::kernels::Launch;
using ::kvx::testing::IsOk;

constexpr unsigned char kGuard = 0xC3;

// The production grid (256 threads, 16 KiB chunks, a block per chunk) and odd
// ones: few threads, chunks that end inside fragments at every phase, and fewer
// blocks than chunks so that blocks stride over the stream.
struct Grid {
  uint64_t threads;
  uint64_t chunk_bytes;
  uint64_t max_blocks;
};
constexpr Grid kGrids[] = {{256, 16384, 1 << 20}, {32, 1000, 3}, {7, 333, 1 << 20}};

template <typename Map>
void RunGrid(const Map& map, uint64_t total, const Grid& grid) {
  uint64_t blocks = (total + grid.chunk_bytes - 1) / grid.chunk_bytes;
  if (blocks > grid.max_blocks) blocks = grid.max_blocks;
  for (uint64_t block = 0; block < blocks; ++block) {
    for (uint64_t thread = 0; thread < grid.threads; ++thread) {
      CopyStream(map, total, grid.chunk_bytes, ThreadIndex{block, blocks, thread, grid.threads});
    }
  }
}

uint64_t Address(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer); }

using CopyBodyTest = ::kvx::kernels::SeededTest;

// Gather and scatter of random lists, as staging.cc lays out the entries.
TEST_F(CopyBodyTest, GatherAndScatterMatchTheHostReference) {
  for (int iteration = 0; iteration < 48; ++iteration) {
    const FragmentShape& shape = ShapeOf(iteration);
    const Grid& grid = kGrids[iteration % std::size(kGrids)];
    SCOPED_TRACE(::testing::Message() << Trace(iteration, shape) << " threads=" << grid.threads
                                      << " chunk_bytes=" << grid.chunk_bytes);
    const ::kvx::testing::FragmentLayout layout = ::kvx::testing::RandomFragmentLayout(
        rng_, shape.max_fragment, 4 * shape.max_fragment + 64, shape.alignment);
    std::vector<unsigned char> src(layout.src_bytes);
    ::kvx::testing::FillRandom(rng_, absl::MakeSpan(src));
    std::vector<kernels::SrcFragment> sources;
    std::vector<CopyEntry> gather_entries;
    uint64_t total = 0;
    for (const auto& f : layout.fragments) {
      sources.push_back({src.data() + f.src_offset, f.length});
      gather_entries.push_back({Address(src.data() + f.src_offset), total});
      total += f.length;
    }
    gather_entries.push_back({0, total});
    const uint64_t offset = std::uniform_int_distribution<uint64_t>(0, 17)(rng_);

    std::vector<unsigned char> expected(offset + total + 9, kGuard);
    ASSERT_THAT(kernels::Gather(Launch::Host(), sources, {expected.data(), expected.size()},
                                offset),
                IsOk());
    std::vector<unsigned char> staging(expected.size(), kGuard);
    RunGrid(ListMap{gather_entries.data(), layout.fragments.size(), staging.data() + offset,
                    CopyDirection::kGather},
            total, grid);
    ASSERT_EQ(FirstDifference(staging, expected), "");

    // Scatter the staging bytes back out to the layout's disjoint destinations.
    std::vector<unsigned char> dst_expected(layout.dst_bytes, kGuard);
    std::vector<unsigned char> dst(layout.dst_bytes, kGuard);
    std::vector<kernels::DstFragment> destinations;
    std::vector<CopyEntry> scatter_entries;
    uint64_t position = 0;
    for (const auto& f : layout.fragments) {
      destinations.push_back({dst_expected.data() + f.dst_offset, f.length});
      scatter_entries.push_back({Address(dst.data() + f.dst_offset), position});
      position += f.length;
    }
    scatter_entries.push_back({0, total});
    ASSERT_THAT(kernels::Scatter(Launch::Host(), {staging.data(), staging.size()}, offset,
                                 destinations),
                IsOk());
    RunGrid(ListMap{scatter_entries.data(), layout.fragments.size(), staging.data() + offset,
                    CopyDirection::kScatter},
            total, grid);
    ASSERT_EQ(FirstDifference(dst, dst_expected), "");
  }
}

// Zero-length fragments between, before and after others move nothing and do
// not stop the walk.
TEST(CopyBodyEdgeTest, EmptyFragmentsAreSkipped) {
  const unsigned char src[5] = {1, 2, 3, 4, 5};
  const std::vector<CopyEntry> entries = {{Address(src), 0},     {Address(src), 0},
                                          {Address(src + 1), 2}, {Address(src), 2},
                                          {Address(src), 2},     {0, 2}};
  for (const Grid& grid : kGrids) {
    std::vector<unsigned char> staging(4, kGuard);
    RunGrid(ListMap{entries.data(), 5, staging.data() + 1, CopyDirection::kGather}, 2, grid);
    EXPECT_EQ(FirstDifference(staging, {kGuard, 1, 2, kGuard}), "");
  }
}

// Split and concat of random layouts, entries as heads.cc lays them out.
TEST_F(CopyBodyTest, HeadSplitAndConcatMatchTheHostReference) {
  for (int iteration = 0; iteration < 150; ++iteration) {
    const kernels::HeadShape shape = kernels::RandomHeadShape(rng_);
    const Grid& grid = kGrids[iteration % std::size(kGrids)];
    SCOPED_TRACE(::testing::Message() << "seed=" << seed_ << " iteration=" << iteration
                                      << " parts=" << shape.parts << " blocks=" << shape.blocks
                                      << " threads=" << grid.threads);
    const uint64_t block_bytes = kernels::BlockBytes(shape.layout).value();
    const uint64_t part_bytes = shape.blocks * block_bytes / shape.parts;
    // Blocks back to back from an odd offset, parts likewise in one buffer.
    std::vector<unsigned char> pool(1 + shape.blocks * block_bytes);
    ::kvx::testing::FillRandom(rng_, absl::MakeSpan(pool));
    std::vector<const void*> blocks;
    std::vector<CopyEntry> entries;
    for (int64_t b = shape.blocks - 1; b >= 0; --b) {  // not in address order
      blocks.push_back(pool.data() + 1 + b * block_bytes);
      entries.push_back({Address(blocks.back()), 0});
    }
    std::vector<unsigned char> expected(3 + shape.parts * part_bytes, kGuard);
    std::vector<unsigned char> parts_buffer(expected.size(), kGuard);
    std::vector<void*> expected_parts;
    for (int64_t p = 0; p < shape.parts; ++p) {
      expected_parts.push_back(expected.data() + 3 + p * part_bytes);
      entries.push_back({Address(parts_buffer.data() + 3 + p * part_bytes), 0});
    }
    ASSERT_THAT(kernels::SplitHeads(Launch::Host(), shape.layout, blocks, expected_parts),
                IsOk());

    const uint64_t head_bytes = shape.layout.tokens_per_block * shape.layout.head_size *
                                shape.layout.element_bytes;
    HeadCopy copy{HeadDirection::kSplit,
                  static_cast<uint64_t>(shape.blocks),
                  static_cast<uint64_t>(shape.parts),
                  static_cast<uint64_t>(shape.layout.layers),
                  head_bytes,
                  head_bytes * (shape.layout.kv_heads_per_rank / shape.parts)};
    RunGrid(HeadMap{entries.data(), copy}, copy.units() * copy.run_bytes, grid);
    ASSERT_EQ(FirstDifference(parts_buffer, expected), "");

    // Concat the parts into a cleared pool: the blocks come back.
    const std::vector<unsigned char> original = pool;
    std::fill(pool.begin() + 1, pool.end(), kGuard);
    copy.direction = HeadDirection::kConcat;
    RunGrid(HeadMap{entries.data(), copy}, copy.units() * copy.run_bytes, grid);
    ASSERT_EQ(FirstDifference(pool, original), "");
  }
}

}  // namespace
}  // namespace kvx::kernels_internal
