#include "transport/loopback/loopback_transport.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"
#include "transport/transport.h"
#include "transport/transport_conformance_test.h"

namespace kvx::transport {
namespace {

using ::kvx::testing::StatusIs;

INSTANTIATE_TEST_SUITE_P(
    Loopback, TransportConformanceTest,
    ::testing::Values(
        TransportFactory{"default", [] { return CreateLoopbackTransport(); }},
        // Tiny pieces and window: splitting and the full-window path on every write.
        TransportFactory{"split_small_window",
                         [] {
                           LoopbackOptions options;
                           options.max_write_bytes = 1000;
                           options.window = 2;
                           options.idle_poll_interval = absl::ZeroDuration();
                           return CreateLoopbackTransport(options);
                         }}),
    [](const auto& info) { return info.param.name; });

TEST(LoopbackTransportTest, MalformedOrUnknownAddressIsRefused) {
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> t, CreateLoopbackTransport());
  EXPECT_THAT(t->AddPeer(""), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(t->AddPeer("KVXL\x01"), StatusIs(absl::StatusCode::kInvalidArgument));
  std::string gone;
  {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> other, CreateLoopbackTransport());
    gone = other->address();
  }
  EXPECT_THAT(t->AddPeer(gone), StatusIs(absl::StatusCode::kUnavailable));
  ASSERT_OK(t->AddPeer(t->address()).status());  // Writing to oneself is allowed.
}

TEST(LoopbackTransportTest, CudaMemoryIsUnimplemented) {
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> t, CreateLoopbackTransport());
  char byte = 0;
  EXPECT_FALSE(t->capabilities().cuda_memory);
  EXPECT_THAT(t->RegisterMemory(&byte, 1, MemoryKind::kCuda),
              StatusIs(absl::StatusCode::kUnimplemented));
  EXPECT_THAT(t->RegisterMemory(nullptr, 1), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(LoopbackTransportTest, WrongKeyNamesPeerWriteAndReason) {
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> a, CreateLoopbackTransport());
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> b, CreateLoopbackTransport());
  std::vector<char> src(64), dst(64);
  ASSERT_OK_AND_ASSIGN(LocalRegion s, a->RegisterMemory(src.data(), src.size()));
  ASSERT_OK_AND_ASSIGN(LocalRegion d, b->RegisterMemory(dst.data(), dst.size()));
  ASSERT_OK_AND_ASSIGN(PeerId peer, a->AddPeer(b->address()));
  RegionDescriptor wrong = d.descriptor;
  wrong.key = 999;
  ASSERT_OK_AND_ASSIGN(TransferId t,
                       a->PostWrites(peer, {{s.id, 0, d.descriptor, 0, 8}, {s.id, 0, wrong, 0, 8}},
                                     absl::Now() + absl::Seconds(10)));
  EXPECT_THAT(a->WaitTransfer(t, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kPermissionDenied,
                       ::testing::AllOf(::testing::HasSubstr("peer=loopback:"),
                                        ::testing::HasSubstr("write=1"),
                                        ::testing::HasSubstr("key=999"))));
}

}  // namespace
}  // namespace kvx::transport
