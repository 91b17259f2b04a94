// The "Integrating an engine" example of README.md, compiled as written: the text
// between the markers below is the README's code block, character for character
// (readme_example_sync_test checks it); readme_example_test runs it.

#include "transfer/transceiver/readme_example.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "cache_reuse/v2_adapter.h"
#include "transfer/page_table.h"
#include "transfer/protocol.h"
#include "transfer/session.h"
#include "transfer/transceiver/transceiver.h"
#include "transport/libfabric/libfabric_transport.h"
#include "transport/transport.h"

namespace kvx_readme {

// README-BEGIN
// Once per rank: its KV pools, its cache manager, a transport. Both roles alike.
absl::StatusOr<std::unique_ptr<kvx::transceiver::Transceiver>> StartRank(
    kvx::transfer::Role role, const std::string& instance,
    const kvx::transfer::RankPageTable& kv_pools, kvx::cache_reuse::CacheReuseAdapter* cache) {
  kvx::transceiver::RankSetup setup;
  setup.page_table = kv_pools;  // pools at their addresses; registered for you
  setup.adapter = cache;        // e.g. a V2Adapter over the engine's paged manager
  setup.create_transport = [](const kvx::transport::EndpointOptions& endpoint) {
    kvx::transport::LibfabricOptions fabric;
    fabric.provider = "tcp;ofi_rxm";  // "efa" or "verbs;ofi_rxm" on RDMA hardware
    fabric.node = "127.0.0.1";
    fabric.endpoint = endpoint;
    return kvx::transport::CreateLibfabricTransport(fabric);
  };
  kvx::transceiver::TransceiverOptions options;
  options.instance = instance;
  options.role = role;
  return kvx::transceiver::Transceiver::Create(options, std::move(setup));
}

// Prefill (context) rank, when a request's prefill is done.
absl::Status SendKv(kvx::transceiver::Transceiver& prefill, uint64_t rid, int64_t prompt_len,
                    int64_t first_token) {
  kvx::transceiver::ContextRequest send;
  send.unique_rid = rid;
  send.prompt_len = prompt_len;
  send.aux_tokens = {first_token};
  return prefill.RespondAndSendAsync(send);
}

// Decode (generation) rank: ask for the request's KV cache, then wait for it.
absl::StatusOr<std::vector<int64_t>> ReceiveKv(kvx::transceiver::Transceiver& decode,
                                                uint64_t rid, int64_t prompt_len) {
  kvx::transceiver::GenerationRequest receive;
  receive.unique_rid = rid;
  receive.prompt_len = prompt_len;
  receive.context_instance = "prefill-0";
  if (absl::Status s = decode.RequestAndReceiveAsync(receive); !s.ok()) return s;
  for (const kvx::transceiver::RequestStatus& done :
       decode.CheckGenTransferStatus(/*at_least=*/1, absl::Now() + absl::Seconds(30))) {
    // Final either way: the request's pages may now be released.
    if (done.state != kvx::transfer::SessionState::kFullyTransferred) return done.error;
    return done.aux_tokens;  // every byte is there: decoding may start
  }
  return absl::DeadlineExceededError("no answer in 30 s");
}
// README-END

}  // namespace kvx_readme
