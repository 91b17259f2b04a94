// Do not include outside tests: the README's integration example, compiled (see
// readme_example.cc).

#ifndef KVX_TRANSFER_TRANSCEIVER_README_EXAMPLE_H_
#define KVX_TRANSFER_TRANSCEIVER_README_EXAMPLE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache_reuse/adapter.h"
#include "transfer/page_table.h"
#include "transfer/protocol.h"
#include "transfer/transceiver/transceiver.h"

namespace kvx_readme {

absl::StatusOr<std::unique_ptr<kvx::transceiver::Transceiver>> StartRank(
    kvx::transfer::Role role, const std::string& instance,
    const kvx::transfer::RankPageTable& kv_pools, kvx::cache_reuse::CacheReuseAdapter* cache);

absl::Status SendKv(kvx::transceiver::Transceiver& prefill, uint64_t rid, int64_t prompt_len,
                    int64_t first_token);

absl::StatusOr<std::vector<int64_t>> ReceiveKv(kvx::transceiver::Transceiver& decode,
                                                uint64_t rid, int64_t prompt_len);

}  // namespace kvx_readme

#endif  // KVX_TRANSFER_TRANSCEIVER_README_EXAMPLE_H_
