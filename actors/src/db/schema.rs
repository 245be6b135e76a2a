//! diesel's view of the tables in `migrations/`.

diesel::table! {
    backends (id) {
        id -> Integer,
        name -> Text,
        base_url -> Text,
        api_key_enc -> Binary,
        key_hint -> Text,
        pool -> Text,
        rpm_limit -> Integer,
        burst -> Nullable<Integer>,
        tpm_limit -> Nullable<BigInt>,
        max_concurrency -> Nullable<Integer>,
        weight -> Double,
        timeout_secs -> Double,
        models -> Text,
        enabled -> Bool,
        source -> Text,
        notes -> Nullable<Text>,
        status -> Text,
        cooldown_until -> Nullable<BigInt>,
        consecutive_429_count -> Integer,
        last_error -> Nullable<Text>,
        created_at -> BigInt,
        updated_at -> BigInt,
        upstream_until -> Nullable<BigInt>,
    }
}

diesel::table! {
    backend_usage_logs (backend_id, model, hour) {
        backend_id -> Integer,
        model -> Text,
        hour -> BigInt,
        requests -> BigInt,
        errors -> BigInt,
        prompt_tokens -> BigInt,
        completion_tokens -> BigInt,
        cost -> Double,
        latency_ms_sum -> Double,
        ttft_ms_sum -> Double,
        ttft_count -> BigInt,
        attempts -> BigInt,
    }
}

diesel::table! {
    cooldown_events (id) {
        id -> Integer,
        backend_id -> Integer,
        started_at -> BigInt,
        until -> BigInt,
        ended_at -> Nullable<BigInt>,
        consecutive_429 -> Integer,
        retry_after_ms -> Nullable<BigInt>,
        reason -> Text,
    }
}

diesel::table! {
    backend_health (backend_id) {
        backend_id -> Integer,
        status -> Text,
        consecutive_failures -> Integer,
        effective_rpm -> Nullable<Integer>,
        latency_ms -> Nullable<Double>,
        last_error -> Nullable<Text>,
        updated_at -> BigInt,
    }
}

diesel::table! {
    system_config (key) {
        key -> Text,
        value -> Text,
        updated_at -> BigInt,
    }
}

diesel::table! {
    daily_stats (day, backend_id, model) {
        day -> Text,
        backend_id -> Integer,
        model -> Text,
        requests -> BigInt,
        errors -> BigInt,
        prompt_tokens -> BigInt,
        completion_tokens -> BigInt,
        cost -> Double,
        latency_ms_sum -> Double,
        ttft_ms_sum -> Double,
        ttft_count -> BigInt,
    }
}

diesel::joinable!(backend_usage_logs -> backends (backend_id));
diesel::joinable!(cooldown_events -> backends (backend_id));
diesel::joinable!(backend_health -> backends (backend_id));
diesel::allow_tables_to_appear_in_same_query!(
    backends,
    backend_usage_logs,
    cooldown_events,
    backend_health
);

diesel::table! {
    rate_state (backend_id) {
        backend_id -> Integer,
        grants -> Text,
        saved_at -> BigInt,
    }
}

diesel::table! {
    affinity (object_id) {
        object_id -> Text,
        account -> Text,
        client -> Nullable<Text>,
        created_at -> BigInt,
    }
}
