// A libfabric target endpoint in its own process, for the two-process tests.
//
//   libfabric_peer --provider='tcp;ofi_rxm' --node=127.0.0.1 --bytes=1048576
//
// Registers --bytes of memory filled with --guard, then prints one line
//   READY <hex endpoint address>
// and serves commands from stdin, one per line:
//   GRANT <hex initiator address>  adds the initiator as a peer, grants it the buffer
//                                  and prints "GRANTED <hex region descriptor>";
//   FENCE                          removes that peer (the fence), keeps a copy of the
//                                  buffer as it is when RemovePeer returned, prints
//                                  "FENCED";
//   UNCHANGED?                     compares the buffer with that copy and prints
//                                  "UNCHANGED" or "CHANGED offset=N";
//   DUMP                           writes the whole buffer, raw, to stdout;
//   EXIT (or end of input)         exits 0.
// The owner thread keeps progressing the endpoint (manual progress) the whole time.
// Errors go to stderr with a non-zero exit.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/dynamic_annotations.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "transport/libfabric/libfabric_transport.h"
#include "transport/transport.h"

ABSL_FLAG(std::string, provider, "tcp;ofi_rxm", "libfabric provider");
ABSL_FLAG(std::string, node, "127.0.0.1", "address to bind");
ABSL_FLAG(uint64_t, bytes, 1 << 20, "size of the registered buffer");
ABSL_FLAG(int, guard, 0xA5, "byte the buffer starts filled with");

namespace kvx::transport {
namespace {

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "libfabric_peer: %s\n", status.ToString().c_str());
  return 1;
}

int Run() {
  LibfabricOptions options;
  options.provider = absl::GetFlag(FLAGS_provider);
  options.node = absl::GetFlag(FLAGS_node);
  absl::StatusOr<std::unique_ptr<Transport>> transport = CreateLibfabricTransport(options);
  if (!transport.ok()) return Fail(transport.status());
  std::vector<char> buffer(absl::GetFlag(FLAGS_bytes),
                           static_cast<char>(absl::GetFlag(FLAGS_guard)));
  absl::StatusOr<RegionId> region = (*transport)->RegisterMemory(buffer.data(), buffer.size());
  if (!region.ok()) return Fail(region.status());
  std::printf("READY %s\n", absl::BytesToHexString((*transport)->address()).c_str());
  std::fflush(stdout);
  std::optional<PeerId> writer;
  std::vector<char> at_fence;
  std::string line;
  while (std::getline(std::cin, line)) {
    if (absl::StartsWith(line, "GRANT ")) {
      absl::StatusOr<PeerId> peer =
          (*transport)->AddPeer(absl::HexStringToBytes(line.substr(6)));
      if (!peer.ok()) return Fail(peer.status());
      absl::StatusOr<RegionDescriptor> grant = (*transport)->GrantRemoteWrite(*region, *peer);
      if (!grant.ok()) return Fail(grant.status());
      writer = *peer;
      std::printf("GRANTED %s\n", absl::BytesToHexString(EncodeRegionDescriptor(*grant)).c_str());
      std::fflush(stdout);
    } else if (line == "FENCE" && writer.has_value()) {
      absl::Status status = (*transport)->RemovePeer(*writer);
      if (!status.ok()) return Fail(status);
      writer.reset();
      // From here on no byte of the initiator's may land (transport.h, semantics 5).
      ABSL_ANNOTATE_IGNORE_READS_BEGIN();
      at_fence = buffer;
      ABSL_ANNOTATE_IGNORE_READS_END();
      std::printf("FENCED\n");
      std::fflush(stdout);
    } else if (line == "UNCHANGED?" && !at_fence.empty()) {
      ABSL_ANNOTATE_IGNORE_READS_BEGIN();
      const auto diff = std::mismatch(buffer.begin(), buffer.end(), at_fence.begin());
      ABSL_ANNOTATE_IGNORE_READS_END();
      if (diff.first == buffer.end()) {
        std::printf("UNCHANGED\n");
      } else {
        std::printf("CHANGED offset=%zu\n", static_cast<size_t>(diff.first - buffer.begin()));
      }
      std::fflush(stdout);
    } else if (line == "DUMP") {
      // The provider's progress (our owner thread) wrote the buffer; what orders
      // those writes before this read is the initiator's delivery-complete and its
      // DUMP line, which cross processes where ThreadSanitizer cannot follow.
      ABSL_ANNOTATE_IGNORE_READS_BEGIN();
      const size_t written = std::fwrite(buffer.data(), 1, buffer.size(), stdout);
      ABSL_ANNOTATE_IGNORE_READS_END();
      if (written != buffer.size()) {
        return Fail(absl::DataLossError("short write of the buffer to stdout"));
      }
      std::fflush(stdout);
    } else if (line == "EXIT") {
      break;
    } else {
      return Fail(absl::InvalidArgumentError("unknown command: " + line));
    }
  }
  transport->reset();  // Before the buffer it may still be receiving into.
  return 0;
}

}  // namespace
}  // namespace kvx::transport

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvx::transport::Run();
}
