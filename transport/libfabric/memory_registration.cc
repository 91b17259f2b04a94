#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>

#include <sys/uio.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "transport/internal/mutex.h"
#include "transport/internal/random.h"
#include "transport/internal/write_engine.h"
#include "transport/libfabric/internal/fabric_endpoint.h"
#include "transport/transport.h"

namespace kvx::libfabric_internal {

// How each mr_mode bit the provider returned is honoured:
//   FI_MR_LOCAL      every write passes the local region's fi_mr_desc.
//   FI_MR_VIRT_ADDR  a grant advertises the virtual address; else offsets (0).
//   FI_MR_PROV_KEY   the key comes from fi_mr_key; else we choose random keys.
//   FI_MR_ENDPOINT   the region is bound to our endpoint and enabled.
//   FI_MR_ALLOCATED  callers register allocated memory only (Transport contract).
//   FI_MR_HMEM       device memory is registered through fi_mr_regattr with its iface.
//
// Every registration is its own fid_mr: the local one (no remote access, so its key
// opens nothing) and one per (region, peer) grant with FI_REMOTE_WRITE. The provider
// checks a remote write's key and access against its MR map (tcp: once per message,
// before the first byte lands; shm: before it copies), so closing a grant's fid_mr
// refuses every later write through it.
absl::StatusOr<fid_mr*> FabricEndpoint::RegisterMr(void* base, uint64_t length,
                                                   transport::MemoryKind kind,
                                                   uint64_t access) {
  const uint64_t mr_mode = info_->domain_attr->mr_mode;
  if (kind != transport::MemoryKind::kHost && (info_->caps & FI_HMEM) == 0) {
    return absl::UnimplementedError(
        absl::StrCat("provider cannot register device memory (no FI_HMEM): provider=",
                     info_->fabric_attr->prov_name));
  }
  fid_mr* mr = nullptr;
  int ret = -FI_ENOKEY;
  // A random key collides with one in use with probability ~n/2^64; retry anyway.
  for (int attempt = 0; attempt < 8 && ret == -FI_ENOKEY; ++attempt) {
    const uint64_t requested_key = transport_internal::RandomKey();
    if (kind == transport::MemoryKind::kHost) {
      ret = fi_mr_reg(domain_, base, length, access, 0, requested_key, 0, &mr, nullptr);
    } else {
      iovec iov{base, length};
      fi_mr_attr attr = {};
      attr.mr_iov = &iov;
      attr.iov_count = 1;
      attr.access = access;
      attr.requested_key = requested_key;
      attr.iface = FI_HMEM_CUDA;
      attr.device.cuda = 0;  // TODO: take the device from the pointer (issue 10).
      ret = fi_mr_regattr(domain_, &attr, 0, &mr);
    }
  }
  if (ret != 0) return FabricError(absl::StrCat("fi_mr_reg length=", length), ret);
  if ((mr_mode & FI_MR_ENDPOINT) != 0) {
    ret = fi_mr_bind(mr, &ep_->fid, 0);
    if (ret == 0) ret = fi_mr_enable(mr);
    if (ret != 0) {
      fi_close(&mr->fid);
      return FabricError("fi_mr_bind/fi_mr_enable", ret);
    }
  }
  transport_internal::MutexLock lock(&mrs_mu_);
  mrs_.insert(mr);
  return mr;
}

absl::StatusOr<transport_internal::BackendRegion> FabricEndpoint::Register(
    void* base, uint64_t length, transport::MemoryKind kind) {
  absl::StatusOr<fid_mr*> mr = RegisterMr(base, length, kind, FI_WRITE | FI_READ);
  if (!mr.ok()) return mr.status();
  transport_internal::BackendRegion region;
  region.desc = fi_mr_desc(*mr);
  region.handle = *mr;
  region.kind = kind;
  return region;
}

absl::StatusOr<transport_internal::BackendGrant> FabricEndpoint::Grant(
    const transport_internal::BackendRegion& region, char* base, uint64_t length) {
  absl::StatusOr<fid_mr*> mr = RegisterMr(base, length, region.kind, FI_REMOTE_WRITE);
  if (!mr.ok()) return mr.status();
  transport_internal::BackendGrant grant;
  grant.handle = *mr;
  grant.descriptor.address = (info_->domain_attr->mr_mode & FI_MR_VIRT_ADDR) != 0
                                 ? reinterpret_cast<uint64_t>(base)
                                 : 0;
  grant.descriptor.length = length;
  grant.descriptor.key = fi_mr_key(*mr);
  return grant;
}

void FabricEndpoint::Deregister(const transport_internal::BackendRegion& region) {
  fid_mr* mr = static_cast<fid_mr*>(region.handle);
  {
    transport_internal::MutexLock lock(&mrs_mu_);
    mrs_.erase(mr);
  }
  fi_close(&mr->fid);
}

void FabricEndpoint::Revoke(const transport_internal::BackendGrant& grant) {
  fid_mr* mr = static_cast<fid_mr*>(grant.handle);
  {
    transport_internal::MutexLock lock(&mrs_mu_);
    mrs_.erase(mr);
  }
  fi_close(&mr->fid);
}

}  // namespace kvx::libfabric_internal
