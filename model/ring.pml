/*
 * ring.pml -- a Promela model of the shmcast ring protocol (docs/protocol.md).
 *
 * One writer, NREADERS readers, a ring of NSLOTS slots, NMSG messages.
 * Every message fills exactly one slot (sequences count slots, and slot s
 * lives at index s mod NSLOTS); message s carries the distinct value VAL(s).
 *
 * What is modelled
 *   P1  publish: the writer fills a slot (plain store), then release-stores
 *       write_seq.
 *   P2  release: a reader copies a slot out (plain load), then release-stores
 *       its read_seq.
 *   I1  backpressure: the writer fills slot w only when w < min(read_seq) + NSLOTS.
 *   P3  readers sleep on data_futex (Dekker handshake with `sleepers`, the
 *       readers asleep now, and `announced`, the count of sleeps ever
 *       announced; the writer wakes only if `sleepers > 0` and the count moved
 *       since its last wake).  The model keeps, instead of the count and the
 *       writer's `woken_at`, the one bit the writer's decision depends on:
 *       `moved`, true when the count differs from `woken_at`.  A reader's
 *       announcement sets it.  The writer's load of the count reads it and
 *       clears it in the same step, and sets it again if it then does not
 *       wake (woken_at is only updated by a wake; nobody else reads the bit,
 *       and an announcement in between would only set it too).  It starts
 *       true, as `woken_at` starts at a value no count has.
 *   P3  on a socket: the first NASYNC readers (an event loop's readers) sleep
 *       on a datagram socket of their own instead of the futex: drain the
 *       socket, mark their line and count themselves in `sock_sleepers`,
 *       announce as above, re-check, block until a datagram is pending.  The
 *       writer's wake (when it decides to wake, as above) also sends a
 *       datagram to every marked reader while `sock_sleepers > 0`; a
 *       datagram stays pending until the reader drains it (`pending[i]`, one
 *       bit: a second datagram to a full socket is dropped, EAGAIN).  The
 *       skip on an unmoved count applies to the signal too.
 *   P4  the writer sleeps on space_futex (Dekker handshake with
 *       `writer_sleeping`).
 *   Futexes: futex_wait(word, expected) compares the word and, if it still
 *   equals `expected`, enters the wait set -- both in one atomic step, as the
 *   kernel does under its hash-bucket lock; otherwise it returns at once
 *   (EAGAIN).  futex_wake removes waiters from the wait set.  A waiter stays
 *   blocked until it is removed.
 *
 * Properties (see check.sh)
 *   safety (assertions, pan compiled with -DSAFETY):
 *     - no slot is overwritten before every reader released it (I1, ghost
 *       assertion in the writer against the readers' current read_seq);
 *     - a reader reads only published slots (I2), each message in order and
 *       with its own value (assertion at the copy-out);
 *   no deadlock (invalid end states, same run): the only end states are the
 *     ends of the Writer (every message published) and of each Reader (every
 *     message read); a process blocked in futex_wait is at no end state;
 *   liveness (ltl `delivered`, pan -a): every message is eventually read
 *     by every reader.  No fairness assumption is needed (every run of the
 *     correct model is finite), so the check is run without -f; it passes
 *     with -f too, which is a weaker claim.
 *
 * What is deliberately NOT modelled
 *   - The bounded sleep (the 100 ms slice of I3), and spurious wake-ups.
 *     Both would let a sleeper leave futex_wait by itself and would therefore
 *     hide a lost wake-up.  Here every sleep is infinite: the protocol must be
 *     correct without any timeout.  A process blocked forever in futex_wait is
 *     not at a valid end state, so spin reports it as an invalid end state
 *     (deadlock), and the liveness property fails on it.
 *   - Attach/detach/close/drop (P5, P6), dead peers, multi-slot messages.
 *     The writer simply stops after its last message.
 *
 * Memory model (ASSUMPTION)
 *   Sequential consistency: every load or store of a shared word below is one
 *   atomic Promela statement, and statements of different processes
 *   interleave.  This is sound for the two handshakes because the protocol
 *   puts a full fence (an SC atomic read-modify-write or an explicit fence)
 *   between the store and the load on both sides of each store-buffering
 *   pattern (P3, P4), and the release/acquire pairs of P1 and P2 give the
 *   message-passing orderings used for the slot data.  The model does not
 *   explore weaker-memory reorderings; the BROKEN_* variants below emulate the
 *   reorderings that matter by moving the statements in the program text.
 *
 * Build switches (spin -DNAME ...), each one selects a deliberately wrong
 * variant that the checks must reject:
 *   BROKEN_LATE_ANNOUNCE  P3: the reader increments `announced` after its
 *                         re-check of write_seq (lost wake-up).
 *   BROKEN_ANNOUNCE_FIRST P3: the reader counts its announcement before it
 *                         loads the futex word: a reader counted by the
 *                         writer's look before a wake may load the bumped word
 *                         and sleep through the next message.
 *   BROKEN_COUNT_EARLY    P3: the writer loads `announced` before its release
 *                         store of write_seq (the store-load reordering the
 *                         full fence forbids).
 *   BROKEN_NO_WAKE        P3: the writer never does the fence/check/wake after
 *                         a publish.
 *   BROKEN_LATE_DRAIN     P3 on a socket: the reader drains its socket after
 *                         its re-check (it may drain the signal of a publish
 *                         the re-check missed, then sleep through it).
 *   BROKEN_LATE_MARK      P3 on a socket: the reader marks its line after its
 *                         re-check (a wake that saw the announcement but not
 *                         the mark sends nothing).
 *   BROKEN_WRITER_LATE_FLAG  P4: the writer sets `writer_sleeping` after its
 *                         re-check of the readers (lost wake-up).
 *   BROKEN_EARLY_PUBLISH  P1: the writer stores write_seq before the slot data.
 *   BROKEN_EARLY_RELEASE  P2: the reader stores read_seq before copying out.
 *   BROKEN_GATE           I1: off-by-one backpressure (one slot too many).
 * Sizes can be changed with -DNREADERS=.. (1 to 3), -DNSLOTS=.., -DNMSG=..
 * (below 64: every counter is a byte), -DNASYNC=.. (readers asleep on a
 * socket, 0 to NREADERS; by default 1: one of each kind).
 */

#ifndef NREADERS
#define NREADERS 2
#endif
#ifndef NSLOTS
#define NSLOTS 2
#endif
#ifndef NMSG
#define NMSG 5
#endif
#ifndef NASYNC
#define NASYNC 1
#endif

/* the value carried by message s: distinct for every s, and never 0 (the
 * initial content of every slot), so a stale or early read is detected */
#define VAL(s)  ((s) * 3 + 7)

/* ---------------------------------------------------------------- shared */

byte write_seq;                 /* writer line: number of published slots      */
bool writer_sleeping;           /* writer line: P4 announcement                */
byte read_seq[NREADERS];        /* reader i's line: number of released slots   */
bool moved = true;              /* P3: announced != the writer's woken_at       */
byte sleepers;                  /* P3: readers asleep now (atomic add)          */
byte data_futex;                /* own line: bumped by the writer (P3)         */
byte space_futex;               /* own line: bumped by readers (P4)            */
byte slot[NSLOTS];              /* slot data                                   */
bool marked[NREADERS];          /* reader i's line: asleep on its socket (P3)  */
byte sock_sleepers;             /* P3: readers marked now (atomic add)          */

/* kernel state: the futex wait sets */
bool data_waiting[NREADERS];    /* reader i is queued on data_futex            */
bool space_waiting;             /* the writer is queued on space_futex         */
bool pending[NREADERS];         /* a datagram is queued on reader i's socket   */

/* ------------------------------------------------------- futex primitives */

/* futex_wait(&data_futex, e) by reader `me`, no timeout.
 * Step 1 (atomic, as in the kernel): compare the word; if equal, enqueue.
 *        If not equal, the call returns at once (EAGAIN).
 * Step 2: block until a futex_wake has removed us from the wait set.        */
inline futex_wait_data(me, e)
{
    atomic {
        if
        :: data_futex == e -> data_waiting[me] = true
        :: else -> skip                               /* EAGAIN */
        fi
    };
    !data_waiting[me]                                 /* asleep until woken */
}

/* futex_wake(&data_futex, INT_MAX): wake every queued reader (one syscall,
 * atomic with respect to the wait set) */
inline futex_wake_data_all(k)
{
    d_step {
        k = 0;
        do
        :: k < NREADERS -> data_waiting[k] = false; k++
        :: else -> break
        od;
        k = 0
    }
}

/* futex_wait(&space_futex, e) by the writer, no timeout */
inline futex_wait_space(e)
{
    atomic {
        if
        :: space_futex == e -> space_waiting = true
        :: else -> skip                               /* EAGAIN */
        fi
    };
    !space_waiting                                    /* asleep until woken */
}

/* futex_wake(&space_futex, 1): the writer is the only possible waiter */
inline futex_wake_space()
{
    space_waiting = false
}

/* The writer's gating sequence: g = min over readers of read_seq[i].
 * One acquire load per reader (each its own step);
 * the loaded value goes to a local first, so that it is read only once. */
inline gate(g, t, k)
{
    g = read_seq[0];
    k = 1;
    do
    :: k < NREADERS ->
        t = read_seq[k];
        if
        :: t < g -> g = t
        :: else -> skip
        fi;
        k++
    :: else -> break
    od;
    k = 0; t = 0
}

/* ----------------------------------------------------------------- reader */

active [NREADERS] proctype Reader()
{
    byte me = _pid;     /* readers are declared first: pids 0..NREADERS-1 */
    byte r = 0;         /* the reader's own copy of read_seq[me] */
    byte v;             /* the value copied out of the slot */
    byte e;             /* futex word loaded before the re-check (P3) */

    do
    :: r == NMSG -> break
    :: r < NMSG ->
        if
        :: r < write_seq ->             /* acquire load of write_seq: slot r is published (I2) */
#ifdef BROKEN_EARLY_RELEASE
            read_seq[me] = r + 1;       /* BROKEN: release before the copy */
#endif
            /* P2: copy the slot out (plain load).  Ghost checks, in the same
             * step: I2 (the slot is published) and the message is the next
             * one, in order, with the right value (nothing overwritten it,
             * nothing stale). */
            atomic {
                v = slot[r % NSLOTS];
                assert(r < write_seq);
                assert(v == VAL(r))
            };
#ifndef BROKEN_EARLY_RELEASE
            read_seq[me] = r + 1;       /* P2: release store of read_seq */
#endif
            r++;
            v = 0;

            /* P4, reader side: full fence (implicit under SC), then
             * if load(writer_sleeping): bump space_futex and wake the writer. */
            if
            :: writer_sleeping ->
                space_futex++;          /* P4: atomic_add(space_futex, +1) */
                futex_wake_space()      /* P4: futex_wake(space_futex, 1) */
            :: else -> skip
            fi

        :: else -> if
        :: me < NASYNC ->
            /* P3 on a socket, reader side: nothing to read. */
#ifndef BROKEN_LATE_DRAIN
            pending[me] = false;        /* 1: drain (recv until EAGAIN) */
#endif
#ifndef BROKEN_LATE_MARK
            marked[me] = true;          /* 2: mark the line (seq_cst exchange) */
            sock_sleepers++;            /*    and count it (atomic add) */
#endif
            moved = true;               /* 3: announce: atomic_add(announced, +1) */
            sleepers++;                 /*    atomic_add(sleepers, +1) */
            if
            :: r < write_seq -> skip    /* 4: re-check write_seq: it moved, go read */
            :: else ->
#ifdef BROKEN_LATE_DRAIN
                pending[me] = false;    /* BROKEN: drain after the re-check */
#endif
#ifdef BROKEN_LATE_MARK
                marked[me] = true;      /* BROKEN: mark after the re-check */
                sock_sleepers++;
#endif
                pending[me]             /* 5: await readability, no timeout */
            fi;
            marked[me] = false;         /* undo, loop (the next round drains) */
            sock_sleepers--;
            sleepers--
        :: else ->
            /* P3, reader side: nothing to read. */
#ifndef BROKEN_LATE_ANNOUNCE
#ifndef BROKEN_ANNOUNCE_FIRST
            e = data_futex;             /* P3 1: e = load_acquire(data_futex) */
            moved = true;               /* P3 2: atomic_add(announced, +1), full fence */
            sleepers++;                 /*       atomic_add(sleepers, +1) */
#else
            moved = true;               /* BROKEN: P3 2 before P3 1 */
            sleepers++;
            e = data_futex;
#endif
            if
            :: r < write_seq ->         /* P3 3: re-check write_seq: it moved, go read */
                sleepers--
            :: else ->
                futex_wait_data(me, e); /* P3 4: futex_wait(data_futex, e), no timeout */
                sleepers--              /*       atomic_add(sleepers, -1), loop */
            fi;
#else
            e = data_futex;             /* P3 1 */
            if
            :: r < write_seq -> skip    /* P3 3, but nothing announced yet */
            :: else ->
                moved = true;           /* BROKEN: P3 2 after the re-check */
                sleepers++;
                futex_wait_data(me, e);
                sleepers--
            fi;
#endif
            e = 0
        fi fi
    od;
    /* The only valid end state of a reader: it read every message. */
    assert(read_seq[me] == NMSG)
}

/* ----------------------------------------------------------------- writer */

active proctype Writer()
{
    byte w = 0;         /* the writer's own copy of write_seq */
    byte g;             /* gating sequence (min read_seq) */
    byte e;             /* futex word loaded before the re-check (P4) */
    byte t, k;          /* scratch */
    bool c;             /* P3: whether announced moved, as loaded after a publish */

    do
    :: w == NMSG -> break
    :: w < NMSG ->
        gate(g, t, k);                  /* acquire loads of read_seq[*] (P2, I1) */
        if
#ifdef BROKEN_GATE
        :: w < g + NSLOTS + 1 ->        /* BROKEN: one slot too many */
#else
        :: w < g + NSLOTS ->            /* I1: slot w is free for every reader */
#endif

#ifdef BROKEN_EARLY_PUBLISH
            write_seq = w + 1;          /* BROKEN: publish before the data */
#endif
#ifdef BROKEN_COUNT_EARLY
            atomic { c = moved; moved = false };  /* BROKEN: P3 writer 2 before the publish */
#endif
            /* P1: fill the slot with a plain store.  The assertion is a
             * ghost check of I1 against the readers' *current* read_seq:
             * no slot is overwritten before every reader released it. */
            atomic {
                k = 0;
                do
                :: k < NREADERS -> assert(w < read_seq[k] + NSLOTS); k++
                :: else -> break
                od;
                k = 0;
                slot[w % NSLOTS] = VAL(w)
            };
#ifndef BROKEN_EARLY_PUBLISH
            write_seq = w + 1;          /* P1: release store of write_seq */
#endif
            w++;
            g = 0;

#ifndef BROKEN_NO_WAKE
            /* P3, writer side.  Step 1, the full fence, is implicit under SC
             * (it is what makes the load below ordered after the store above).
             * Step 2: if the count of announced sleeps moved since the last
             * wake and a reader sleeps now, bump the word and wake everyone.
             * The loads, the add and the wake are separate steps. */
#ifndef BROKEN_COUNT_EARLY
            atomic { c = moved; moved = false };  /* P3 writer 2: load(announced) != woken_at */
#endif
            if
            :: c && sleepers > 0 ->     /* P3 writer 2: then load(sleepers) > 0 */
                data_futex++;           /* P3 writer 2: atomic_add(data_futex, +1) */
                futex_wake_data_all(k); /* P3 writer 2: futex_wake(data_futex, all) */
                /* P3 on a socket, writer side: if readers sleep on a socket
                 * (seq_cst load of the count, after the add above), load each
                 * line's mark (acquire) and send it a datagram (a separate
                 * step: the reader may have moved on meanwhile). */
                if
                :: sock_sleepers > 0 ->
                    k = 0;
                    do
                    :: k < NREADERS ->
                        t = marked[k];
                        if
                        :: t -> pending[k] = true   /* sendto(MSG_DONTWAIT) */
                        :: else -> skip
                        fi;
                        k++
                    :: else -> break
                    od;
                    k = 0; t = 0
                :: else -> skip
                fi
            :: else ->
                if
                :: c -> moved = true    /* no wake: woken_at stays */
                :: else -> skip
                fi
            fi;
            c = false
#endif

        :: else ->
            /* P4, writer side: no free slot. */
#ifndef BROKEN_WRITER_LATE_FLAG
            writer_sleeping = true;     /* P4 1: atomic exchange (full fence) */
            e = space_futex;            /* P4 2: e = load(space_futex) */
            gate(g, t, k);              /* P4 3: re-compute the gating sequence */
            if
            :: w < g + NSLOTS -> skip   /* space appeared: do not sleep */
            :: else ->
                futex_wait_space(e)     /* P4 4: sleep only if still full */
            fi;
#else
            e = space_futex;
            gate(g, t, k);              /* BROKEN: re-check before announcing */
            if
            :: w < g + NSLOTS -> skip
            :: else ->
                writer_sleeping = true; /* BROKEN: announced too late */
                futex_wait_space(e)
            fi;
#endif
            writer_sleeping = false;    /* P4: withdraw the announcement, loop */
            e = 0; g = 0
        fi
    od;
    /* The only valid end state of the writer: it published every message. */
    assert(write_seq == NMSG)
}

/* ------------------------------------------------------------- liveness */

/* Every message is eventually published and read by every reader.  The
 * message count is finite, so this is the same as "every published message
 * is eventually read by every reader" plus "the writer eventually publishes
 * all it has to send".  A state in which a process sleeps forever is a
 * terminal state that does not satisfy it (spin extends finite runs by
 * stuttering), so a lost wake-up is reported as an acceptance cycle.
 * Check it with pan -a.  Weak fairness (pan -a -f) is not needed: in the
 * correct model no run loops forever before every message is delivered, so
 * not even a scheduler that starves a process can prevent the delivery. */
#if NREADERS == 2
ltl delivered { <> (read_seq[0] == NMSG && read_seq[1] == NMSG) }
#elif NREADERS == 3
ltl delivered { <> (read_seq[0] == NMSG && read_seq[1] == NMSG && read_seq[2] == NMSG) }
#elif NREADERS == 1
ltl delivered { <> (read_seq[0] == NMSG) }
#else
#error "the ltl formula is written for 1 to 3 readers"
#endif
