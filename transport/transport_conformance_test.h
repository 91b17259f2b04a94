// File: transport/transport_conformance_test.h
//
// The conformance suite every Transport backend passes: byte-exact random fragment
// lists with guard bytes, bounds and key checks, deregistration while in flight,
// a peer that disappears, and the transfer bookkeeping. A backend instantiates it:
//
//   INSTANTIATE_TEST_SUITE_P(
//       Loopback, TransportConformanceTest,
//       ::testing::Values(kvx::transport::TransportFactory{"loopback", [] {
//         return kvx::transport::CreateLoopbackTransport();
//       }}),
//       [](const auto& info) { return info.param.name; });
//
// Randomness comes from gtest's --gtest_random_seed (traced as seed=N).

#ifndef KVX_TRANSPORT_TRANSPORT_CONFORMANCE_TEST_H_
#define KVX_TRANSPORT_TRANSPORT_CONFORMANCE_TEST_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "transport/transport.h"

namespace kvx::transport {

struct TransportFactory {
  std::string name;
  // Creates one endpoint; called twice per test (initiator and target). A factory
  // that returns `Unavailable` skips the test with the status printed.
  std::function<absl::StatusOr<std::unique_ptr<Transport>>()> create;
  // When not empty, the tests with a misbehaving peer (wrong key, forged length, a
  // peer that is gone) are skipped with this reason: a backend known to hang or
  // crash there, documented in its README.
  std::string skip_bad_peer_tests = "";
};

// Two endpoints per test: `initiator_` knows `target_` as `peer_`.
class TransportConformanceTest : public ::testing::TestWithParam<TransportFactory> {
 protected:
  void SetUp() override;

  std::unique_ptr<Transport> initiator_;
  std::unique_ptr<Transport> target_;
  PeerId peer_ = 0;
};

}  // namespace kvx::transport

#endif  // KVX_TRANSPORT_TRANSPORT_CONFORMANCE_TEST_H_
