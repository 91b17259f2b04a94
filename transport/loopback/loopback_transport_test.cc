#include "transport/loopback/loopback_transport.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/notification.h"
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
        TransportFactory{"default",
                         [](const EndpointOptions& options) {
                           return CreateLoopbackTransport(options);
                         }},
        // Tiny pieces and window: splitting and the full-window path on every write.
        TransportFactory{"split_small_window",
                         [](const EndpointOptions& base) {
                           EndpointOptions options = base;
                           options.max_write_bytes = 1000;
                           options.peer_window = 2;
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
  ASSERT_OK_AND_ASSIGN(RegionId s, a->RegisterMemory(src.data(), src.size()));
  ASSERT_OK_AND_ASSIGN(RegionId d, b->RegisterMemory(dst.data(), dst.size()));
  ASSERT_OK_AND_ASSIGN(PeerId writer, b->AddPeer(a->address()));
  ASSERT_OK_AND_ASSIGN(RegionDescriptor grant, b->GrantRemoteWrite(d, writer));
  ASSERT_OK_AND_ASSIGN(PeerId peer, a->AddPeer(b->address()));
  RegionDescriptor wrong = grant;
  wrong.key ^= 1;
  ASSERT_OK_AND_ASSIGN(TransferId t, a->PostWrites(peer, {{s, 0, grant, 0, 8}, {s, 0, wrong, 0, 8}},
                                                   absl::Now() + absl::Seconds(10)));
  EXPECT_THAT(AwaitTransfer(*a, t, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kUnavailable,
                       ::testing::AllOf(::testing::HasSubstr("peer=loopback:"),
                                        ::testing::HasSubstr("write=1"),
                                        ::testing::HasSubstr("no grant for this key"))));
}

// Loopback can tell who writes: a key granted to one endpoint opens nothing to
// another, even if it leaks (libfabric tcp cannot check this; its keys are secrets).
TEST(LoopbackTransportTest, KeyGrantedToAnotherWriterIsRefused) {
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> target, CreateLoopbackTransport());
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> owner, CreateLoopbackTransport());
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> thief, CreateLoopbackTransport());
  std::vector<char> src(64, 's'), dst(64, 'g');
  ASSERT_OK_AND_ASSIGN(RegionId d, target->RegisterMemory(dst.data(), dst.size()));
  ASSERT_OK_AND_ASSIGN(PeerId owner_id, target->AddPeer(owner->address()));
  ASSERT_OK_AND_ASSIGN(RegionDescriptor grant, target->GrantRemoteWrite(d, owner_id));
  ASSERT_OK_AND_ASSIGN(RegionId s, thief->RegisterMemory(src.data(), src.size()));
  ASSERT_OK_AND_ASSIGN(PeerId peer, thief->AddPeer(target->address()));
  ASSERT_OK_AND_ASSIGN(TransferId t, thief->PostWrites(peer, {{s, 0, grant, 0, 64}},
                                                       absl::Now() + absl::Seconds(10)));
  EXPECT_THAT(AwaitTransfer(*thief, t, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(dst, std::vector<char>(64, 'g'));
}

TEST(LoopbackTransportTest, TransferUpdateHookWakesAWaiter) {
  absl::Notification updated;
  EndpointOptions options;
  options.on_transfer_update = [&updated] {
    if (!updated.HasBeenNotified()) updated.Notify();
  };
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> a, CreateLoopbackTransport(options));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> b, CreateLoopbackTransport());
  std::vector<char> src(64, 's'), dst(64);
  ASSERT_OK_AND_ASSIGN(RegionId s, a->RegisterMemory(src.data(), src.size()));
  ASSERT_OK_AND_ASSIGN(RegionId d, b->RegisterMemory(dst.data(), dst.size()));
  ASSERT_OK_AND_ASSIGN(PeerId writer, b->AddPeer(a->address()));
  ASSERT_OK_AND_ASSIGN(RegionDescriptor grant, b->GrantRemoteWrite(d, writer));
  ASSERT_OK_AND_ASSIGN(PeerId peer, a->AddPeer(b->address()));
  ASSERT_OK_AND_ASSIGN(TransferId t, a->PostWrites(peer, {{s, 0, grant, 0, 64}},
                                                   absl::Now() + absl::Seconds(10)));
  EXPECT_TRUE(updated.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_OK(AwaitTransfer(*a, t, absl::InfiniteFuture()));
}

}  // namespace
}  // namespace kvx::transport
