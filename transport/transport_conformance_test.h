// File: transport/transport_conformance_test.h
//
// The conformance suite every Transport backend passes: one test (or more) per
// semantics item of transport.h, each checked from both sides. Byte-exact random
// fragment lists with guard bytes; bounds, keys and grants (a stranger guessing keys);
// the fence (a target removing its initiator mid-transfer), deadlines and cancels,
// each followed by "snapshot the target's memory, wait, compare"; a stopped peer next
// to a healthy one; garbage peer addresses; 100k queued transfers; the error codes.
// A backend instantiates it:
//
//   INSTANTIATE_TEST_SUITE_P(
//       Loopback, TransportConformanceTest,
//       ::testing::Values(kvx::transport::TransportFactory{
//           "loopback", [](const kvx::transport::EndpointOptions& options) {
//             return kvx::transport::CreateLoopbackTransport(options);
//           }}),
//       [](const auto& info) { return info.param.name; });
//
// Randomness comes from gtest's --gtest_random_seed (traced as seed=N).

#ifndef KVX_TRANSPORT_TRANSPORT_CONFORMANCE_TEST_H_
#define KVX_TRANSPORT_TRANSPORT_CONFORMANCE_TEST_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "transport/transport.h"

namespace kvx::transport {

struct TransportFactory {
  std::string name;
  // Creates one endpoint with `options` (the suite shortens timeouts); called two or
  // three times per test. A factory that returns `Unavailable` skips the test with
  // the status printed.
  std::function<absl::StatusOr<std::unique_ptr<Transport>>(const EndpointOptions&)> create;
  // When not empty, the tests with a misbehaving peer (wrong key, forged length, a
  // peer that is gone, a stranger) are skipped with this reason: a backend known to
  // hang or crash there, documented in its README.
  std::string skip_bad_peer_tests = "";
  // When not empty, an initiator that a target fenced cannot write to anyone any more
  // (the reason says why): the fence test then checks the target's memory without
  // bringing the fenced initiator back.
  std::string fence_wedges_initiator = "";
};

// Two endpoints per test: `initiator_` knows `target_` as `peer_`; `target_` knows
// `initiator_` as `writer_`.
class TransportConformanceTest : public ::testing::TestWithParam<TransportFactory> {
 protected:
  void SetUp() override;

  // The options every endpoint of the suite is created with.
  static EndpointOptions Options();
  absl::StatusOr<std::unique_ptr<Transport>> Create() { return GetParam().create(Options()); }

  // Registers `bytes` at the target and grants the initiator write access.
  RegionDescriptor Expose(std::vector<unsigned char>& bytes, RegionId* region = nullptr);
  // Registers `bytes` at the initiator as the source of writes.
  RegionId Source(std::vector<unsigned char>& bytes);

  std::unique_ptr<Transport> initiator_;
  std::unique_ptr<Transport> target_;
  PeerId peer_ = 0;
  PeerId writer_ = 0;
};

}  // namespace kvx::transport

#endif  // KVX_TRANSPORT_TRANSPORT_CONFORMANCE_TEST_H_
