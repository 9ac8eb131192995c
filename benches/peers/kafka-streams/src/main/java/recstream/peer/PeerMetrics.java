package recstream.peer;

import java.util.concurrent.atomic.AtomicLong;

/** Counters printed when the peer stops. */
final class PeerMetrics {
    static final AtomicLong REJECTED = new AtomicLong();
    static final AtomicLong DUPLICATES = new AtomicLong();

    private PeerMetrics() {}
}
