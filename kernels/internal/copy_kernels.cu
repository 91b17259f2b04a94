// The CUDA kernels of //kernels, compiled by nvcc for sm_80 and sm_90
// (third_party/cuda.bzl). Host code reaches them through copy_kernels.h; what
// each thread does is copy_body.h, which the host tests also run.

#include <cstdint>

#include "kernels/internal/copy_body.h"
#include "kernels/internal/copy_kernels.h"

namespace kvx::kernels_internal {
namespace {

constexpr int kThreads = 256;
// 16 KiB per chunk: one unrolled pass of 256 threads x 4 x 16 bytes.
constexpr uint64_t kChunkBytes = 16 * 1024;
// Larger streams are walked grid-stride.
constexpr uint64_t kMaxBlocks = uint64_t{1} << 20;

template <typename Map>
__global__ void __launch_bounds__(kThreads) CopyKernel(Map map, uint64_t total) {
  CopyStream(map, total, kChunkBytes,
             ThreadIndex{blockIdx.x, gridDim.x, threadIdx.x, blockDim.x});
}

template <typename Map>
int LaunchStream(const Map& map, uint64_t total, void* stream) {
  if (total == 0) return cudaSuccess;
  uint64_t blocks = (total + kChunkBytes - 1) / kChunkBytes;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  CopyKernel<Map><<<static_cast<unsigned>(blocks), kThreads, 0,
                    static_cast<cudaStream_t>(stream)>>>(map, total);
  return cudaGetLastError();
}

}  // namespace

int LaunchCopyKernel(const CopyEntry* entries, uint64_t count, CopyDirection direction,
                     void* staging, uint64_t total_bytes, void* stream) {
  return LaunchStream(ListMap{entries, count, static_cast<unsigned char*>(staging), direction},
                      total_bytes, stream);
}

int LaunchHeadKernel(const CopyEntry* entries, const HeadCopy& copy, void* stream) {
  return LaunchStream(HeadMap{entries, copy}, copy.units() * copy.run_bytes, stream);
}

}  // namespace kvx::kernels_internal
