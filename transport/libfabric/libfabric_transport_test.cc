#include "transport/libfabric/libfabric_transport.h"

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"
#include "transport/internal/sanitizers.h"
#include "transport/transport.h"
#include "transport/transport_conformance_test.h"

namespace kvx::transport {
namespace {

using ::kvx::testing::StatusIs;
using ::testing::HasSubstr;

LibfabricOptions Options(const std::string& provider) {
  LibfabricOptions options;
  options.provider = provider;
  options.node = "127.0.0.1";
  return options;
}

INSTANTIATE_TEST_SUITE_P(
    Libfabric, TransportConformanceTest,
    ::testing::Values(
        TransportFactory{"tcp",
                         [] { return CreateLibfabricTransport(Options("tcp;ofi_rxm")); }},
        // Small pieces and window: splitting and -FI_EAGAIN retries on every transfer.
        TransportFactory{"tcp_split_small_window",
                         [] {
                           LibfabricOptions options = Options("tcp;ofi_rxm");
                           options.max_write_bytes = 64 << 10;
                           options.window = 4;
                           return CreateLibfabricTransport(options);
                         }},
        TransportFactory{"shm",
                         []() -> absl::StatusOr<std::unique_ptr<Transport>> {
                           if (transport_internal::kThreadSanitizer) {
                             return absl::UnavailableError(
                                 "shm is not run under ThreadSanitizer: libfabric 1.17's "
                                 "shm crashes or hangs in its first write there");
                           }
                           return CreateLibfabricTransport(Options("shm"));
                         },
                         "shm in libfabric 1.17 never completes a write with a wrong key "
                         "and crashes writing to a closed endpoint (README.md)"}),
    [](const auto& info) { return info.param.name; });

TEST(LibfabricTransportTest, UnknownProviderFailsLoudly) {
  EXPECT_THAT(CreateLibfabricTransport(Options("no-such-provider")),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("provider=no-such-provider")));
}

TEST(LibfabricTransportTest, MalformedOrForeignAddressIsRefused) {
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Transport> t,
                       CreateLibfabricTransport(Options("tcp;ofi_rxm")));
  EXPECT_EQ(t->capabilities().backend, "tcp;ofi_rxm");
  const std::string good = t->address();
  EXPECT_THAT(t->AddPeer(""), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(t->AddPeer(good.substr(0, good.size() - 1)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(t->AddPeer(good + "x"), StatusIs(absl::StatusCode::kInvalidArgument));
  std::string foreign = good;
  foreign[6] = 'x';  // First byte of the provider name.
  EXPECT_THAT(t->AddPeer(foreign),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("another provider")));
}

}  // namespace
}  // namespace kvx::transport
