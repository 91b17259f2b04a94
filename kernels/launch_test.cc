#include "kernels/launch.h"

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/device.h"
#include "testing/status_matchers.h"

namespace kvx::kernels {
namespace {

using ::kvx::testing::IsOk;
using ::kvx::testing::StatusIs;
using ::testing::HasSubstr;

TEST(LaunchTest, HostLaunchIsSynchronous) {
  const Launch host = Launch::Host();
  EXPECT_EQ(host.backend, Backend::kHost);
  EXPECT_THAT(Wait(host), IsOk());
}

TEST(LaunchTest, CudaLaunchCarriesItsStream) {
  int marker = 0;
  const Launch launch = Launch::Cuda(nullptr, CudaStream(&marker));
  EXPECT_EQ(launch.backend, Backend::kCuda);
  EXPECT_EQ(launch.stream.native(), &marker);
  EXPECT_EQ(CudaStream().native(), nullptr);
}

TEST(LaunchTest, WorkspaceCapacityIsCheckedBeforeAnyDevice) {
  EXPECT_THAT(DeviceWorkspace::Create(0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("capacity=0")));
  EXPECT_THAT(DeviceWorkspace::Create(int64_t{1} << 33),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max=4294967296")));
}

// Without the toolkit every device call says so; with it but without a device
// (this machine, CI) the CUDA error comes back as Unavailable; with a device it
// works. No outcome crashes or hangs.
TEST(LaunchTest, DeviceCallsFailCleanlyWithoutADevice) {
  const absl::StatusOr<int> devices = CudaDeviceCount();
  if (!BuiltWithCuda()) {
    EXPECT_THAT(devices, StatusIs(absl::StatusCode::kUnimplemented,
                                  HasSubstr("op=device_count")));
    EXPECT_THAT(DeviceWorkspace::Create(16), StatusIs(absl::StatusCode::kUnimplemented));
    EXPECT_THAT(DeviceBuffer::Create(16), StatusIs(absl::StatusCode::kUnimplemented));
    EXPECT_THAT(DeviceTimer::Create(), StatusIs(absl::StatusCode::kUnimplemented));
    EXPECT_THAT(Wait(Launch::Cuda(nullptr)), StatusIs(absl::StatusCode::kUnimplemented));
    return;
  }
  if (devices.ok() && *devices > 0) GTEST_SKIP() << "a CUDA device is present";
  if (!devices.ok()) {
    EXPECT_THAT(devices, StatusIs(absl::StatusCode::kUnavailable,
                                  HasSubstr("call=cudaGetDeviceCount")));
  }
  EXPECT_FALSE(DeviceWorkspace::Create(16).ok());
  EXPECT_FALSE(DeviceBuffer::Create(16).ok());
}

TEST(DeviceBufferTest, ZeroBytesIsRejected) {
  EXPECT_THAT(DeviceBuffer::Create(0), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvx::kernels
