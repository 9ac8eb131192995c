package recstream.peer;

/** An exponentially decayed sum anchored at `asOf` (event time), as src/decay.rs. */
public final class Decayed {
    public double value;
    public long asOf;

    public Decayed() {}

    Decayed(double value, long asOf) {
        this.value = value;
        this.asOf = asOf;
    }

    /** Adds `amount` observed at event time `t`; order of arrival does not matter. */
    Decayed add(double amount, long t, double halfLifeMs) {
        if (t >= asOf) {
            return new Decayed(value * Rules.decayFactor(t - asOf, halfLifeMs) + amount, t);
        }
        return new Decayed(value + amount * Rules.decayFactor(asOf - t, halfLifeMs), asOf);
    }
}
