#include "transport/libfabric/libfabric_transport.h"

#include <rdma/fabric.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "transport/internal/wire_format.h"
#include "transport/internal/write_engine.h"
#include "transport/libfabric/internal/fabric_endpoint.h"
#include "transport/transport.h"

namespace kvx::transport {
namespace {

using libfabric_internal::FabricEndpoint;
using transport_internal::BackendGrant;
using transport_internal::BackendPeer;
using transport_internal::BackendRegion;
using transport_internal::Completion;
using transport_internal::PostedWrite;

// Address wire format, little-endian: magic "KVXF" (4) | version (1) |
// provider name length (1) | provider name | raw address length (2) | raw address.
// Version history: 1 is the first.
constexpr absl::string_view kAddressMagic = "KVXF";
constexpr uint8_t kAddressVersion = 1;
constexpr uint64_t kMaxRawAddressBytes = 1024;

class LibfabricTransport final : public transport_internal::WriteEngine {
 public:
  LibfabricTransport(std::unique_ptr<FabricEndpoint> endpoint,
                     const transport_internal::EngineOptions& options)
      : WriteEngine(options),
        endpoint_(std::move(endpoint)),
        provider_(endpoint_->info().fabric_attr->prov_name) {
    StartOwnerThread();
  }

  ~LibfabricTransport() override {
    StopOwnerThread();
    endpoint_.reset();
  }

  Capabilities capabilities() const override {
    Capabilities caps;
    caps.backend = provider_;
    caps.host_memory = true;
    caps.cuda_memory = (endpoint_->info().caps & FI_HMEM) != 0;
    caps.max_write_bytes = engine_options().max_write_bytes;
    caps.peer_window = engine_options().peer_window;
    caps.max_in_flight = engine_options().max_in_flight;
    return caps;
  }

  std::string address() const override {
    std::string out(kAddressMagic);
    transport_internal::AppendLittleEndian(kAddressVersion, 1, &out);
    transport_internal::AppendLittleEndian(provider_.size(), 1, &out);
    out += provider_;
    transport_internal::AppendLittleEndian(endpoint_->raw_name().size(), 2, &out);
    out += endpoint_->raw_name();
    return out;
  }

 protected:
  absl::StatusOr<BackendRegion> RegisterWithBackend(void* base, uint64_t length,
                                                    MemoryKind kind) override {
    return endpoint_->Register(base, length, kind);
  }

  void DeregisterWithBackend(const BackendRegion& region) override {
    endpoint_->Deregister(region);
  }

  absl::StatusOr<BackendGrant> GrantWithBackend(const BackendRegion& region, char* base,
                                                uint64_t length,
                                                const BackendPeer& peer) override {
    return endpoint_->Grant(region, base, length);
  }

  void RevokeWithBackend(const BackendGrant& grant) override { endpoint_->Revoke(grant); }

  absl::StatusOr<uint64_t> ResetPeer(const BackendPeer& peer) override {
    return endpoint_->ResetPeer(peer);
  }

  void ForgetPeer(const BackendPeer& peer) override { endpoint_->RemovePeer(peer.handle); }

  absl::StatusOr<BackendPeer> ResolvePeer(absl::string_view address) override {
    transport_internal::WireReader reader(address);
    absl::string_view magic, provider, raw;
    uint64_t version = 0, provider_len = 0, raw_len = 0;
    if (!reader.ReadBytes(4, &magic) || magic != kAddressMagic ||
        !reader.ReadLittleEndian(1, &version) || version != kAddressVersion ||
        !reader.ReadLittleEndian(1, &provider_len) || !reader.ReadBytes(provider_len, &provider) ||
        !reader.ReadLittleEndian(2, &raw_len) || raw_len == 0 ||
        raw_len > kMaxRawAddressBytes || !reader.ReadBytes(raw_len, &raw) ||
        reader.remaining() != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("malformed libfabric address: size=", address.size()));
    }
    if (provider != provider_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "peer uses another provider: peer_provider=", provider, " ours=", provider_));
    }
    return endpoint_->InsertPeer(raw);
  }

  absl::StatusOr<PostResult> PostToBackend(const PostedWrite& write, void* context) override {
    absl::StatusOr<bool> posted = endpoint_->PostWrite(write, context);
    if (!posted.ok()) return posted.status();
    return *posted ? PostResult::kPosted : PostResult::kQueueFull;
  }

  void PollBackend(std::vector<Completion>* completions) override {
    endpoint_->Poll(completions);
  }

 private:
  std::unique_ptr<FabricEndpoint> endpoint_;
  const std::string provider_;
};

absl::StatusOr<libfabric_internal::InfoPtr> ChooseProvider(const LibfabricOptions& options) {
  if (!options.provider.empty()) {
    return libfabric_internal::FindProvider(options.provider, options.node);
  }
  std::string refusals;
  for (const char* name : libfabric_internal::kAutoProviders) {
    absl::StatusOr<libfabric_internal::InfoPtr> info =
        libfabric_internal::FindProvider(name, options.node);
    if (info.ok()) {
      std::fprintf(stderr, "kvx transport: libfabric provider chosen automatically: %s\n",
                   name);
      return info;
    }
    absl::StrAppend(&refusals, "; ", info.status().message());
  }
  return absl::UnavailableError(absl::StrCat("no usable libfabric provider", refusals));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Transport>> CreateLibfabricTransport(
    const LibfabricOptions& options) {
  // RemovePeer's fence and the quiesce reset need rxm to close a peer's connection
  // when the peer leaves the address vector. libfabric reads this once, when the
  // process first calls it.
  if (const char* cleanup = std::getenv("FI_AV_REMOVE_CLEANUP");
      cleanup != nullptr && (absl::string_view(cleanup) == "0" ||
                             absl::EqualsIgnoreCase(cleanup, "false") ||
                             absl::EqualsIgnoreCase(cleanup, "no"))) {
    return absl::FailedPreconditionError(absl::StrCat(
        "FI_AV_REMOVE_CLEANUP=", cleanup,
        " disables the connection teardown kvx's fences rely on; unset it"));
  }
  setenv("FI_AV_REMOVE_CLEANUP", "1", /*overwrite=*/0);
  absl::StatusOr<libfabric_internal::InfoPtr> info = ChooseProvider(options);
  if (!info.ok()) return info.status();
  const fi_info& fi = **info;
  transport_internal::EngineOptions engine = options.endpoint;
  const int64_t tx_size = std::max<int64_t>(1, static_cast<int64_t>(fi.tx_attr->size));
  engine.max_in_flight =
      engine.max_in_flight > 0 ? std::min(engine.max_in_flight, tx_size) : tx_size;
  engine.peer_window = std::max<int64_t>(1, std::min(engine.peer_window, engine.max_in_flight));
  uint64_t max_write = std::min<uint64_t>(fi.ep_attr->max_msg_size, uint64_t{1} << 30);
  if (engine.max_write_bytes != 0) max_write = std::min(max_write, engine.max_write_bytes);
  engine.max_write_bytes = std::max<uint64_t>(1, max_write);
  absl::StatusOr<std::unique_ptr<FabricEndpoint>> endpoint =
      FabricEndpoint::Open(*std::move(info), 2 * engine.max_in_flight);
  if (!endpoint.ok()) return endpoint.status();
  return std::make_unique<LibfabricTransport>(*std::move(endpoint), engine);
}

}  // namespace kvx::transport
