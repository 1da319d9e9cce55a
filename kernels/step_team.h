// A thread team for the GEMVs of a decode step of one to a few requests (dense_gemv_cpu.cpp,
// int8_linear_cpu.cpp), in place of an OpenMP parallel region per call.
//
// One stream's step is ~40 GEMVs with a few microseconds of small ops between them, then a gap of a few hundred
// microseconds while the server hands the token to gRPC and the client reads it. OpenMP's idle threads either
// sleep at once (OMP_WAIT_POLICY=PASSIVE: a futex wake-up before every GEMV) or spin for a fixed count (libgomp's
// GOMP_SPINCOUNT), which on two cores either costs the step its wake-ups or keeps a core busy through the gap that
// the event loop and the client need. These workers spin for SPIN_US after their last job, which bridges every
// gap inside a step, and then sleep until the next job, so a step pays at most one wake-up and leaves the cores
// free between steps.
//
// The caller is member 0 and never waits for a sleeping worker: a job is a function of the member index that
// must be correct for any subset of members (the GEMVs claim units of work from shared counters, so whoever
// comes does the rest), and a worker that arrives after the caller has finished finds the job closed and leaves
// it alone. The workers are detached and the team is never destroyed: a static destructor would wait at exit
// for threads blocked in a wait. After a fork the child has no workers, and the caller does every job alone.
#pragma once

#include <immintrin.h>
#include <omp.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tessera_team {

constexpr int64_t SPIN_US = 100;  // how long an idle worker spins before it sleeps

class Team {
 public:
  // Runs job(member) on the caller (member 0) and on up to `members - 1` workers, returning once every member
  // that joined is done. A second thread calling while the team is busy runs its job alone.
  void run(int members, const std::function<void(int)>& job) {
    if (busy_.exchange(true, std::memory_order_acquire)) return job(0);
    if (members > 1) grow(members - 1);
    job_ = &job;
    helpers_ = members - 1;
    done_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> opening(join_mutex_);  // a worker sees the job's fields with its generation
      joined_ = 0;
      open_ = true;
      generation_.fetch_add(1, std::memory_order_seq_cst);
    }
    if (helpers_ > 0 && sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    job(0);
    int joined;
    {
      std::lock_guard<std::mutex> closing(join_mutex_);  // from here a worker that has not joined leaves it alone
      open_ = false;
      joined = joined_;
    }
    while (done_.load(std::memory_order_acquire) < joined) _mm_pause();
    busy_.store(false, std::memory_order_release);
  }

 private:
  void grow(int helpers) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (workers_ < helpers) {
      const int member = ++workers_;
      std::thread([this, member] {
        pthread_setname_np(pthread_self(), "tessera-team");  // how the tests find them
        work(member);
      }).detach();
    }
  }

  void work(int member) {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      await(seen);
      {
        std::lock_guard<std::mutex> joining(join_mutex_);
        seen = generation_.load(std::memory_order_relaxed);  // the job now open, joined at most once
        if (!open_ || member > helpers_) continue;  // finished without us, or a smaller team this time
        ++joined_;
      }
      (*job_)(member);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  // Until a generation after `seen`: spins for SPIN_US, then sleeps.
  void await(uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(SPIN_US);
    for (int i = 0;; ++i) {
      if (generation_.load(std::memory_order_acquire) != seen) return;
      _mm_pause();
      if (i % 64 == 63 && std::chrono::steady_clock::now() > until) break;
    }
    std::unique_lock<std::mutex> lock(mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    while (generation_.load(std::memory_order_seq_cst) == seen) wake_.wait(lock);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }

  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0}, done_{0};
  std::atomic<bool> busy_{false};
  const std::function<void(int)>* job_ = nullptr;
  int helpers_ = 0, workers_ = 0;
  int joined_ = 0;     // under join_mutex_
  bool open_ = false;  // under join_mutex_
  std::mutex mutex_, join_mutex_;
  std::condition_variable wake_;
};

// The team of this library with TESSERA_STEP_TEAM=1, else none (OpenMP's threads): measured on the 2-core AMX
// Xeon it made no difference beyond the noise (served bf16 stream 369 against 379 tok/s, means of 5 alternating
// runs; the server's CPU 5.2-5.5 ms a 2.7 ms token either way), so it stays opt-in until a machine shows it pays.
inline Team* team() {
  static Team* const instance = [] {
    const char* on = std::getenv("TESSERA_STEP_TEAM");
    return on != nullptr && on[0] == '1' ? new Team() : nullptr;
  }();
  return instance;
}

// The next unit of a member's share, claimed one at a time so that a member done early can take over the rest
// of another's share; on its own cache line, as both may touch it.
struct alignas(64) Share {
  std::atomic<int64_t> next;
  int64_t end;
};

// do_unit(u) for u in [0, units) on up to `threads` threads: each streams its own contiguous share front to back
// (one sequential read that prefetches run ahead of; units handed out in turn made every thread jump between
// far-apart units, ~1.5x slower), then helps with the shares still unfinished, so that a thread that lost its
// core to the server's other threads leaves its share to the rest rather than holding up the whole step. On the
// team where it is on, else (or where the caller is in a parallel region already) in an OpenMP region.
template <typename F>
void for_each_unit(int threads, int64_t units, const F& do_unit) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, units)));
  std::vector<Share> shares(threads);
  for (int t = 0; t < threads; ++t) {
    shares[t].next.store(units * t / threads, std::memory_order_relaxed);
    shares[t].end = units * (t + 1) / threads;
  }
  const std::function<void(int)> job = [&](int me) {  // correct for any subset of the members
    for (int i = 0; i < threads; ++i) {
      Share& share = shares[(me + i) % threads];
      for (int64_t u = share.next++; u < share.end; u = share.next++) do_unit(u);
    }
  };
  if (threads > 1 && !omp_in_parallel() && team() != nullptr) return team()->run(threads, job);
#pragma omp parallel num_threads(threads) if (threads > 1 && !omp_in_parallel())
  job(omp_get_thread_num());  // 0 when the region runs on this thread alone
}

}  // namespace tessera_team
