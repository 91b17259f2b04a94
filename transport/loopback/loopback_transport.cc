#include "transport/loopback/loopback_transport.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "transport/internal/mutex.h"
#include "transport/internal/random.h"
#include "transport/internal/wire_format.h"
#include "transport/internal/write_engine.h"
#include "transport/transport.h"

namespace kvx::transport {
namespace {

using transport_internal::BackendGrant;
using transport_internal::BackendPeer;
using transport_internal::BackendRegion;
using transport_internal::Completion;
using transport_internal::Mutex;
using transport_internal::MutexLock;
using transport_internal::PostedWrite;

// Address wire format, little-endian, 13 bytes: magic "KVXL" (4) | version (1) |
// endpoint id (8). Version history: 1 is the first.
constexpr absl::string_view kAddressMagic = "KVXL";
constexpr uint8_t kAddressVersion = 1;

class LoopbackTransport;

// Every loopback endpoint of the process, by id. Lock order: registry, then an
// endpoint's targets_mu_.
struct Registry {
  Mutex mu;
  uint64_t next_id ABSL_GUARDED_BY(mu) = 1;
  absl::flat_hash_map<uint64_t, LoopbackTransport*> endpoints ABSL_GUARDED_BY(mu);
};

Registry& GetRegistry() {
  static Registry* registry = new Registry();  // Never destroyed: used at exit.
  return *registry;
}

class LoopbackTransport final : public transport_internal::WriteEngine {
 public:
  explicit LoopbackTransport(const transport_internal::EngineOptions& options)
      : WriteEngine(options) {
    Registry& registry = GetRegistry();
    {
      MutexLock lock(&registry.mu);
      id_ = registry.next_id++;
      registry.endpoints[id_] = this;
    }
    StartOwnerThread();
  }

  ~LoopbackTransport() override {
    StopOwnerThread();
    Registry& registry = GetRegistry();
    {
      MutexLock lock(&registry.mu);
      registry.endpoints.erase(id_);
    }
    // Wait for any memcpy into our memory that started before the erase.
    MutexLock lock(&targets_mu_);
  }

  Capabilities capabilities() const override {
    Capabilities caps;
    caps.backend = "loopback";
    caps.host_memory = true;
    caps.cuda_memory = false;
    caps.max_write_bytes = engine_options().max_write_bytes;
    caps.peer_window = engine_options().peer_window;
    caps.max_in_flight = engine_options().max_in_flight;
    return caps;
  }

  std::string address() const override {
    std::string out(kAddressMagic);
    transport_internal::AppendLittleEndian(kAddressVersion, 1, &out);
    transport_internal::AppendLittleEndian(id_, 8, &out);
    return out;
  }

 protected:
  absl::StatusOr<BackendRegion> RegisterWithBackend(void* base, uint64_t length,
                                                    MemoryKind kind) override {
    if (kind != MemoryKind::kHost) {
      return absl::UnimplementedError(absl::StrCat(
          "loopback registers host memory only: kind=", static_cast<int>(kind)));
    }
    return BackendRegion{};
  }

  void DeregisterWithBackend(const BackendRegion& region) override {}

  absl::StatusOr<BackendGrant> GrantWithBackend(const BackendRegion& region, char* base,
                                                uint64_t length,
                                                const BackendPeer& peer) override {
    MutexLock lock(&targets_mu_);
    BackendGrant grant;
    grant.descriptor.address = 0;  // Offset addressing, like tcp.
    grant.descriptor.length = length;
    do {
      grant.descriptor.key = transport_internal::RandomKey();
    } while (targets_.contains(grant.descriptor.key));
    targets_[grant.descriptor.key] = Target{base, length, peer.handle};
    return grant;
  }

  void RevokeWithBackend(const BackendGrant& grant) override {
    MutexLock lock(&targets_mu_);  // Waits for a memcpy through this grant.
    targets_.erase(grant.descriptor.key);
  }

  absl::StatusOr<BackendPeer> ResolvePeer(absl::string_view address) override {
    transport_internal::WireReader reader(address);
    absl::string_view magic;
    uint64_t version = 0;
    uint64_t id = 0;
    if (address.size() != 13 || !reader.ReadBytes(4, &magic) || magic != kAddressMagic ||
        !reader.ReadLittleEndian(1, &version) || version != kAddressVersion ||
        !reader.ReadLittleEndian(8, &id)) {
      return absl::InvalidArgumentError(
          absl::StrCat("malformed loopback address: size=", address.size()));
    }
    Registry& registry = GetRegistry();
    MutexLock lock(&registry.mu);
    if (!registry.endpoints.contains(id)) {
      return absl::UnavailableError(absl::StrCat("no loopback endpoint: endpoint=", id));
    }
    return BackendPeer{id, absl::StrCat("loopback:", id), std::string(address)};
  }

  // Writes are synchronous memcpy: nothing is ever in flight to reset or forget.
  absl::StatusOr<uint64_t> ResetPeer(const BackendPeer& peer) override { return peer.handle; }
  void ForgetPeer(const BackendPeer& peer) override {}

  absl::StatusOr<PostResult> PostToBackend(const PostedWrite& write,
                                           void* context) override {
    done_.push_back(Completion{context, CopyToPeer(write)});
    return PostResult::kPosted;
  }

  void PollBackend(std::vector<Completion>* completions) override {
    for (Completion& c : done_) completions->push_back(std::move(c));
    done_.clear();
  }

 private:
  // What a grant lets one writer do.
  struct Target {
    char* base = nullptr;
    uint64_t length = 0;
    uint64_t writer = 0;  // The only endpoint allowed to use the key.
  };

  // The target-side checks a NIC or provider would do, then the copy.
  absl::Status CopyToPeer(const PostedWrite& write) const {
    Registry& registry = GetRegistry();
    registry.mu.Lock();
    auto it = registry.endpoints.find(write.peer);
    if (it == registry.endpoints.end()) {
      registry.mu.Unlock();
      return absl::UnavailableError(
          absl::StrCat("loopback endpoint is gone: endpoint=", write.peer));
    }
    LoopbackTransport* target = it->second;
    // Hand over hand: the target cannot finish destruction while we hold its lock.
    target->targets_mu_.Lock();
    registry.mu.Unlock();
    absl::Status status = target->CopyLocked(write, id_);
    target->targets_mu_.Unlock();
    return status;
  }

  absl::Status CopyLocked(const PostedWrite& write, uint64_t writer)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(targets_mu_) {
    auto it = targets_.find(write.remote_key);
    // Semantics 8: refusals are Unavailable, as a network target's are.
    if (it == targets_.end() || it->second.writer != writer) {
      return absl::UnavailableError(absl::StrCat(
          "target refused the write: no grant for this key and writer: endpoint=", id_,
          " writer=", writer));
    }
    const Target& t = it->second;
    if (write.remote_address > t.length || write.length > t.length - write.remote_address) {
      return absl::UnavailableError(absl::StrCat(
          "target refused the write: range outside the granted region: endpoint=", id_,
          " offset=", write.remote_address, " length=", write.length,
          " region_length=", t.length));
    }
    if (write.length > 0) std::memcpy(t.base + write.remote_address, write.local, write.length);
    return absl::OkStatus();
  }

  uint64_t id_ = 0;  // Constant after construction.
  Mutex targets_mu_;
  absl::flat_hash_map<uint64_t, Target> targets_ ABSL_GUARDED_BY(targets_mu_);
  std::vector<Completion> done_;  // Owner thread only.
};

}  // namespace

absl::StatusOr<std::unique_ptr<Transport>> CreateLoopbackTransport(
    const EndpointOptions& options) {
  transport_internal::EngineOptions engine = options;
  if (engine.max_write_bytes == 0) engine.max_write_bytes = uint64_t{1} << 30;
  if (engine.max_in_flight <= 0) engine.max_in_flight = 1024;
  return std::make_unique<LoopbackTransport>(engine);
}

}  // namespace kvx::transport
