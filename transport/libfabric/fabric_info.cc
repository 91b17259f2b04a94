#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_errno.h>

#include <unistd.h>

#include <cstring>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "transport/internal/random.h"
#include "transport/libfabric/internal/fabric_endpoint.h"

namespace kvx::libfabric_internal {
namespace {

// The mr_mode bits we know how to honour (memory_registration.cc).
constexpr int kMrModesHandled = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED |
                                FI_MR_PROV_KEY | FI_MR_ENDPOINT | FI_MR_HMEM;

InfoPtr BaseHints(const std::string& provider, const std::string& node) {
  InfoPtr hints(fi_allocinfo());
  hints->ep_attr->type = FI_EP_RDM;
  hints->fabric_attr->prov_name = strdup(provider.c_str());
  if (!node.empty()) {
    // Without this, tcp offers the external interface and IPv6 first (notes, item 5);
    // shm names endpoints by string.
    hints->addr_format = provider == "shm" ? FI_ADDR_STR : FI_SOCKADDR_IN;
  }
  return hints;
}

int GetInfo(const std::string& node, const fi_info* hints, fi_info** out) {
  const bool bind = !node.empty();
  return fi_getinfo(FI_VERSION(1, 17), bind ? node.c_str() : nullptr, nullptr,
                    bind ? FI_SOURCE : 0, hints, out);
}

// shm names its endpoint (and its file in /dev/shm) after the pid unless told
// otherwise; two processes in different PID namespaces (two Bazel tests running at
// once) then collide. A random name cannot.
std::string UniqueShmName() {
  return absl::StrCat("kvx-", getpid(), "-", absl::Hex(transport_internal::RandomKey(),
                                                        absl::kZeroPad16));
}

}  // namespace

absl::StatusOr<InfoPtr> FindProvider(const std::string& provider, const std::string& node) {
  const bool shm = provider == "shm";
  const std::string bind_node = shm ? UniqueShmName() : node;
  InfoPtr hints = BaseHints(provider, bind_node);
  hints->caps = FI_RMA | FI_WRITE | FI_REMOTE_WRITE;
  if (shm) {
    // Without RMA ordering shm takes its "fast RMA" path: the initiator copies
    // straight into the target's virtual address with no key check at all, so a
    // target could neither refuse a write nor fence a peer. Ordered, every write goes
    // through the target's key check and is copied by the target's own progress.
    hints->tx_attr->msg_order = FI_ORDER_RAW | FI_ORDER_WAW;
  }
  // We hand the provider 64 bytes of per-operation context (fi_context2).
  hints->mode = FI_CONTEXT | FI_CONTEXT2;
  hints->domain_attr->mr_mode = kMrModesHandled;
  hints->domain_attr->threading = FI_THREAD_SAFE;
  fi_info* found = nullptr;
  const int ret = GetInfo(bind_node, hints.get(), &found);
  if (ret == 0) return InfoPtr(found);

  // Explain: is the provider there at all, and if so what does it lack?
  InfoPtr bare = BaseHints(provider, bind_node);
  fi_info* any = nullptr;
  if (GetInfo(bind_node, bare.get(), &any) != 0) {
    return absl::UnavailableError(absl::StrCat(
        "libfabric provider not available: provider=", provider, " node=",
        bind_node.empty() ? "(default)" : bind_node, " fi_getinfo ret=", ret, " (",
        fi_strerror(-ret), ")"));
  }
  InfoPtr any_owner(any);
  std::string lacks;
  if ((any->caps & (FI_RMA | FI_WRITE | FI_REMOTE_WRITE)) !=
      (FI_RMA | FI_WRITE | FI_REMOTE_WRITE)) {
    absl::StrAppend(&lacks, " FI_RMA writes");
  }
  if (any->domain_attr->threading != FI_THREAD_SAFE &&
      any->domain_attr->threading != FI_THREAD_UNSPEC) {
    absl::StrAppend(&lacks, " FI_THREAD_SAFE");
  }
  if ((any->domain_attr->mr_mode & ~(kMrModesHandled | FI_MR_BASIC | FI_MR_SCALABLE)) != 0) {
    absl::StrAppend(&lacks, " mr_mode=", any->domain_attr->mr_mode,
                    " (handled=", kMrModesHandled, ")");
  }
  if ((any->mode & ~(FI_CONTEXT | FI_CONTEXT2)) != 0) {
    absl::StrAppend(&lacks, " mode=", any->mode);
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "libfabric provider lacks what kvx needs (FI_EP_RDM, FI_RMA write, FI_THREAD_SAFE, "
      "a handled mr_mode): provider=", provider, " lacks:", lacks.empty() ? " (unknown)" : lacks,
      " fi_getinfo ret=", ret, " (", fi_strerror(-ret), ")"));
}

}  // namespace kvx::libfabric_internal
