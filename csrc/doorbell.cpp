// The worker's per-job path of the shared-memory hand-off, in C++: the Python serve loop spent
// about 30 us per job picking the job up and publishing its completion, which this loop does in a
// few microseconds.
#include "doorbell.h"

#include <atomic>
#include <chrono>
#include <exception>

#include "checks.h"
#include "host_ops.h"

namespace omniserve {
namespace {

// time.perf_counter()'s clock on Linux (CLOCK_MONOTONIC), in seconds: the watch words hold it.
inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The words are written by another process: read and write them as atomics so the compiler
// neither caches nor reorders them (x86 keeps stores in order and loads in order).
inline double load(const double* w) {
  double x;
  __atomic_load(w, &x, __ATOMIC_ACQUIRE);
  return x;
}
inline void store(double* w, double x) { __atomic_store(w, &x, __ATOMIC_RELEASE); }

const std::vector<std::string> kFields = {"job", "done", "watch", "q", "k", "v", "out", "lse",
                                          "kv_indptr", "kv_indices", "kv_last_page_len"};
const std::vector<std::string> kJobFields = {"seq", "layer", "num_rows", "num_pages", "append_kv", "method",
                                             "sm_scale", "plan_id"};
constexpr size_t kMaxPlans = 64;  // plans kept: more than the row sets of the jobs a client keeps in flight
const std::vector<std::string> kDoneFields = {"seq", "ok", "kernel_us", "planned"};
const std::vector<std::string> kWatchFields = {"worker_polling_until", "client_waiting_until"};
enum Tensors { kQ, kK, kV, kOut, kLse, kIndptr, kIndices, kLast };

}  // namespace

DoorbellLoop::DoorbellLoop(const std::vector<std::vector<torch::Tensor>>& slots, const std::vector<std::string>& fields,
                           const std::vector<std::string>& job_fields, const std::vector<std::string>& done_fields,
                           const std::vector<std::string>& watch_fields, std::vector<torch::Tensor> k_caches,
                           std::vector<torch::Tensor> v_caches, std::string kv_layout, torch::Tensor handled,
                           double margin_s)
    : k_caches_(std::move(k_caches)), v_caches_(std::move(v_caches)), layout_(std::move(kv_layout)),
      handled_(std::move(handled)), margin_s_(margin_s) {
  TORCH_CHECK_VALUE(fields == kFields && job_fields == kJobFields && done_fields == kDoneFields &&
                        watch_fields == kWatchFields,
                    "the staging layout of omniserve_sgl.worker.staging and the C++ doorbell loop differ: "
                    "rebuild the extension");
  TORCH_CHECK_VALUE(handled_.scalar_type() == torch::kFloat64 && handled_.dim() == 1 &&
                        handled_.size(0) == static_cast<int64_t>(slots.size()),
                    "handled must be float64 [num_slots]");
  TORCH_CHECK_VALUE(k_caches_.size() == v_caches_.size() && !k_caches_.empty(), "give one K and V cache per layer");
  const CacheShape c = check_caches(k_caches_[0], v_caches_[0], parse_layout(layout_));
  num_pages_ = c.num_pages;
  page_size_ = c.page_size;
  for (const auto& s : slots) {
    TORCH_CHECK_VALUE(s.size() == kFields.size(), "each slot needs its ", kFields.size(), " tensors");
    for (int i = 0; i < 3; ++i) TORCH_CHECK_VALUE(s[i].scalar_type() == torch::kFloat64, "words must be float64");
    slots_.push_back({s[0].data_ptr<double>(), s[1].data_ptr<double>(), s[2].data_ptr<double>(),
                      std::vector<torch::Tensor>(s.begin(), s.begin() + 3),
                      std::vector<torch::Tensor>(s.begin() + 3, s.end())});
  }
}

// The slot's tensors cut to the job's rows and pages, cached: every layer of a decode step cuts the
// same views.
const std::vector<torch::Tensor>& DoorbellLoop::views(int64_t slot, int64_t rows, int64_t pages) {
  auto key = std::make_tuple(slot, rows, pages);
  auto it = views_.find(key);
  if (it != views_.end()) return it->second;
  if (views_.size() > 4096) views_.clear();
  const auto& t = slots_[slot].t;
  std::vector<torch::Tensor> v = {t[kQ].narrow(0, 0, rows),       t[kK].narrow(0, 0, rows),
                                  t[kV].narrow(0, 0, rows),       t[kOut].narrow(0, 0, rows),
                                  t[kLse].narrow(0, 0, rows),     t[kIndptr].narrow(0, 0, rows + 1),
                                  t[kIndices].narrow(0, 0, pages), t[kLast].narrow(0, 0, rows)};
  return views_.emplace(key, std::move(v)).first->second;
}

// The plan of a job's page table: the one made for `plan_id` when the client names one it made
// before (the slot then holds the same metadata), else a new one, checked against the caches.
const DecodePlan& DoorbellLoop::plan(double plan_id, const std::vector<torch::Tensor>& v) {
  if (plan_id > 0) {
    auto it = plans_.find(plan_id);
    if (it != plans_.end() && it->second.batch == v[kQ].size(0) &&
        static_cast<int64_t>(it->second.kv_indices.size()) == v[kIndices].size(0))
      return it->second;
  }
  DecodePlan p = plan_paged_decode(v[kIndptr], v[kIndices], v[kLast], num_pages_, page_size_);
  ++plans_made_;
  if (plan_id <= 0) return scratch_ = std::move(p);
  if (plans_.size() >= kMaxPlans) plans_.erase(plans_.begin());  // the oldest id
  return plans_[plan_id] = std::move(p);
}

void DoorbellLoop::publish_polling_until(double until) {
  for (auto& s : slots_) store(&s.watch[0], until);
}

// Polls the slots' doorbells and runs each new "kernel" job (append the new K/V, attend, publish
// the done words, seq last) until `until` (time.perf_counter() seconds); a job run extends `until`
// to spin_s from then and publishes it in the watch words, before the done words. A pass that
// starts at or after `until` is the last, so a job announced while the worker said it polls is
// always seen. Returns early, after at most `slice_s`, so the caller can serve its socket, and
// whenever a job needs it:
//   (kReply, slot, seq, kernel_us, until): the job ran but its client does not watch the done words;
//   (kPython, slot, seq, 0, until): a job this loop does not run (another method, words out of
//     range, or an op that raised): not marked handled, the caller runs it and sends the error;
//   (kIdle, -1, 0, 0, until): time is up.
std::tuple<int64_t, int64_t, double, double, double> DoorbellLoop::serve(double until, double slice_s,
                                                                          double spin_s) {
  double* handled = handled_.data_ptr<double>();
  const double slice_end = now_s() + slice_s;
  const int64_t num_layers = static_cast<int64_t>(k_caches_.size());
  for (;;) {
    const double t = now_s();  // before the doorbells are read: see above
    for (int64_t i = 0; i < static_cast<int64_t>(slots_.size()); ++i) {
      Slot& s = slots_[i];
      const double seq = load(&s.job[0]);
      if (!(seq > handled[i])) continue;
      const int64_t layer = static_cast<int64_t>(s.job[1]), rows = static_cast<int64_t>(s.job[2]),
                    pages = static_cast<int64_t>(s.job[3]);
      const bool append = s.job[4] != 0, kernel_method = s.job[5] == 0;
      const double sm_scale = s.job[6], plan_id = s.job[7];
      if (!kernel_method || layer < 0 || layer >= num_layers || rows < 0 || rows > s.t[kQ].size(0) ||
          pages < 0 || pages > s.t[kIndices].size(0))
        return {kPython, i, seq, 0.0, until};
      double kernel_us;
      const int64_t plans_before = plans_made_;
      try {
        const auto& v = views(i, rows, pages);
        const double t0 = now_s();
        // The append and the attention both go through the plan's checked page ids: a page table
        // is checked once per row set, not once per layer.
        const DecodePlan& p = plan(plan_id, v);
        if (append) run_append_paged_kv(p, v[kK], v[kV], k_caches_[layer], v_caches_[layer], layout_);
        run_paged_decode(p, v[kQ], k_caches_[layer], v_caches_[layer], sm_scale, layout_, "auto", v[kOut], v[kLse]);
        kernel_us = (now_s() - t0) * 1e6;
      } catch (const std::exception&) {
        return {kPython, i, seq, 0.0, until};
      }
      handled[i] = seq;
      // Published before the done words: a client that submits its next job as soon as it sees
      // this one done then finds the worker polling and sends no ZeroMQ message.
      if (spin_s > 0) {
        until = now_s() + spin_s;
        publish_polling_until(until);
      }
      store(&s.done[1], 1.0);
      store(&s.done[2], kernel_us);
      store(&s.done[3], plans_made_ > plans_before ? 1.0 : 0.0);
      store(&s.done[0], seq);
      std::atomic_thread_fence(std::memory_order_seq_cst);  // done[0] visible before watch[1] is read
      const double after = now_s();
      // The client skips the ZeroMQ reply only while it will poll the done words for a while yet.
      if (!(load(&s.watch[1]) > after + margin_s_)) return {kReply, i, seq, kernel_us, until};
    }
    if (t >= until || t >= slice_end) return {kIdle, -1, 0.0, 0.0, until};
  }
}

}  // namespace omniserve
