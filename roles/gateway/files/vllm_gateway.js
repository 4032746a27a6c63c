// The gateway's request handling (njs 0.7, as Debian 12 and Ubuntu ship it). Installed by the
// gateway role; the routes table it reads (vllm_routes.js) is rendered from the fleet's plan.
//
// route:  sends an OpenAI request to the upstream of the model its JSON body names. Only the
//         top-level "model" member is located, by a byte scanner that skips every other value
//         without building it: no depth limit (njs's JSON.parse stops near 32 levels; vLLM
//         accepts far deeper tool schemas) and no copy of the body.
// models: answers GET /v1/models with the union of every model's instances' own answers.
// health: 200 while every model has an instance whose /health answers (its own, or its
//         fallback's), else 503 naming the models that have none.
// A CORS preflight (OPTIONS with Origin and Access-Control-Request-Method) from an origin in
// gateway_cors_origins is answered here, without the key; from any other origin it is refused.
import ROUTES from 'vllm_routes.js';

const MODELS = ROUTES.models;
const NAMES = Object.keys(MODELS);

// A lookup by own property only: "constructor" or "__proto__" are not models.
function model(name) {
    return typeof name === 'string' && Object.prototype.hasOwnProperty.call(MODELS, name) ? MODELS[name] : undefined;
}

function reply(r, status, body, headers) {
    r.headersOut['Content-Type'] = 'application/json';
    r.headersOut['Cache-Control'] = 'no-store';
    Object.keys(headers || {}).forEach(function (name) { r.headersOut[name] = headers[name]; });
    r.return(status, JSON.stringify(body) + '\n');
}

function error(r, status, type, message, param, headers) {
    reply(r, status, {error: {message: message, type: type, param: param || null, code: status}}, headers);
}

function methodNotAllowed(r, allowed) {
    error(r, 405, 'MethodNotAllowedError', 'Method ' + r.method + ' is not allowed here; use ' + allowed + '.', null, {Allow: allowed});
}

// Bytes of the JSON grammar; every other byte (UTF-8 included) is content.
const QUOTE = 34, BACKSLASH = 92, COMMA = 44, COLON = 58;
const OPEN_OBJECT = 123, CLOSE_OBJECT = 125, OPEN_ARRAY = 91, CLOSE_ARRAY = 93;

function isSpace(b) {
    return b === 32 || b === 9 || b === 10 || b === 13;
}

function skipSpace(buf, i) {
    while (i < buf.length && isSpace(buf[i])) {
        i++;
    }
    return i;
}

// Index just past the string whose opening quote is at i, or -1 if it never closes.
function stringEnd(buf, i) {
    let from = i + 1;
    for (;;) {
        const quote = buf.indexOf(QUOTE, from);
        if (quote < 0) {
            return -1;
        }
        let backslashes = 0;
        while (buf[quote - 1 - backslashes] === BACKSLASH) {
            backslashes++;
        }
        if (backslashes % 2 === 0) {
            return quote + 1;
        }
        from = quote + 1;
    }
}

// Index just past the value that starts at i, or -1. Nesting is counted, not recursed into.
function valueEnd(buf, i) {
    const first = buf[i];
    if (first === QUOTE) {
        return stringEnd(buf, i);
    }
    if (first === OPEN_OBJECT || first === OPEN_ARRAY) {
        let depth = 0;
        for (let at = i; at < buf.length; at++) {
            const b = buf[at];
            if (b === QUOTE) {
                const end = stringEnd(buf, at);
                if (end < 0) {
                    return -1;
                }
                at = end - 1;
            } else if (b === OPEN_OBJECT || b === OPEN_ARRAY) {
                depth++;
            } else if (b === CLOSE_OBJECT || b === CLOSE_ARRAY) {
                depth--;
                if (depth === 0) {
                    return at + 1;
                }
            }
        }
        return -1;
    }
    let at = i;
    while (at < buf.length && buf[at] !== COMMA && buf[at] !== CLOSE_OBJECT && buf[at] !== CLOSE_ARRAY && !isSpace(buf[at])) {
        at++;
    }
    return at > i ? at : -1;
}

function decode(buf, start, end) {
    return JSON.parse(buf.slice(start, end).toString());
}

// The top-level "model" member of a JSON object body: {found, value} or {invalid: reason}. The
// scan stops at the first "model" key (vLLM checks the name again where the request lands).
function modelField(buf) {
    const invalid = {invalid: 'The request body is not a valid JSON object.'};
    let i = skipSpace(buf, 0);
    if (buf[i] !== OPEN_OBJECT) {
        return invalid;
    }
    i = skipSpace(buf, i + 1);
    if (buf[i] === CLOSE_OBJECT) {
        return {found: false};
    }
    for (;;) {
        if (buf[i] !== QUOTE) {
            return invalid;
        }
        const keyEnd = stringEnd(buf, i);
        if (keyEnd < 0) {
            return invalid;
        }
        let key;
        try {
            key = decode(buf, i, keyEnd);
        } catch (e) {
            return invalid;
        }
        i = skipSpace(buf, keyEnd);
        if (buf[i] !== COLON) {
            return invalid;
        }
        i = skipSpace(buf, i + 1);
        const end = valueEnd(buf, i);
        if (end < 0) {
            return invalid;
        }
        if (key === 'model') {
            try {
                return {found: true, value: decode(buf, i, end)};
            } catch (e) {
                return invalid;
            }
        }
        i = skipSpace(buf, end);
        if (buf[i] === CLOSE_OBJECT) {
            return {found: false};
        }
        if (buf[i] !== COMMA) {
            return invalid;
        }
        i = skipSpace(buf, i + 1);
    }
}

// Header names a preflight may ask for, as the browser lists them (tokens and commas only).
const HEADER_LIST = /^[A-Za-z0-9!#$%&'*+.^_`|~-]+( *, *[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$/;

// OPTIONS: a browser's CORS preflight is answered for allowed origins (the allowed origin itself
// is added by nginx's add_header); anything else gets what other odd methods get.
function preflight(r, allowed) {
    const origin = r.headersIn['Origin'];
    const asked = r.headersIn['Access-Control-Request-Method'];
    if (!origin || !asked) {
        return methodNotAllowed(r, allowed);
    }
    if (!r.variables.vllm_cors_origin) {
        return error(r, 403, 'ForbiddenError', 'This origin may not call the gateway from a browser (gateway_cors_origins).');
    }
    if (allowed.split(', ').indexOf(asked) < 0) {
        return methodNotAllowed(r, allowed);
    }
    const headers = r.headersIn['Access-Control-Request-Headers'];
    if (headers && HEADER_LIST.test(headers)) {
        r.headersOut['Access-Control-Allow-Headers'] = headers;
    }
    r.headersOut['Access-Control-Allow-Methods'] = allowed;
    r.headersOut['Access-Control-Max-Age'] = '600';
    r.return(204);
}

function route(r) {
    r.variables.vllm_model = '-';
    if (r.method === 'OPTIONS') {
        return preflight(r, 'GET, HEAD, POST');
    }
    if (r.method !== 'POST' && r.method !== 'GET' && r.method !== 'HEAD') {
        return methodNotAllowed(r, 'GET, HEAD, POST');
    }
    const body = r.requestBuffer;
    let name;
    if (body && body.length > 0) {
        const field = modelField(body);
        if (field.invalid) {
            return error(r, 400, 'BadRequestError', field.invalid);
        }
        name = field.found ? field.value : undefined;
    }
    if (name === undefined && NAMES.length === 1) {
        name = NAMES[0];
    }
    if (typeof name !== 'string') {
        return error(r, 400, 'BadRequestError', 'The request body names no "model".', 'model');
    }
    const target = model(name);
    if (target === undefined) {
        return error(r, 404, 'NotFoundError', 'The model `' + name + '` does not exist.', 'model');
    }
    r.variables.vllm_model = name;
    r.internalRedirect('@' + target.upstream);
}

async function models(r) {
    r.variables.vllm_model = '-';
    if (r.method === 'OPTIONS') {
        return preflight(r, 'GET, HEAD');
    }
    if (r.method !== 'GET' && r.method !== 'HEAD') {
        return methodNotAllowed(r, 'GET, HEAD');
    }
    const replies = await Promise.all(NAMES.map(function (name) {
        return r.subrequest('/_vllm_models/' + MODELS[name].upstream, {method: 'GET'})
            .catch(function () { return {status: 502}; });
    }));
    const denied = replies.find(function (answer) { return answer.status === 401; });
    if (denied) {
        r.headersOut['Content-Type'] = 'application/json';
        return r.return(401, denied.responseText);
    }
    const seen = {};
    const data = [];
    replies.forEach(function (answer) {
        if (answer.status !== 200) {
            return;
        }
        let listed;
        try {
            listed = JSON.parse(answer.responseText).data;
        } catch (e) {
            return;
        }
        (Array.isArray(listed) ? listed : []).forEach(function (entry) {
            if (entry && model(entry.id) !== undefined && !Object.prototype.hasOwnProperty.call(seen, entry.id)) {
                seen[entry.id] = true;
                data.push(entry);
            }
        });
    });
    if (data.length === 0) {
        return error(r, 503, 'ServiceUnavailableError', 'No model has a healthy instance.');
    }
    reply(r, 200, {object: 'list', data: data});
}

async function health(r) {
    const instances = [];
    NAMES.forEach(function (name) {
        MODELS[name].instances.forEach(function (id) {
            if (instances.indexOf(id) < 0) {
                instances.push(id);
            }
        });
    });
    const answers = await Promise.all(instances.map(function (id) {
        return r.subrequest('/_vllm_health/' + id, {method: 'GET'})
            .then(function (answer) { return answer.status === 200; }, function () { return false; });
    }));
    const up = {};
    instances.forEach(function (id, n) { up[id] = answers[n]; });
    const count = function (name) {
        return MODELS[name].instances.filter(function (id) { return up[id]; }).length;
    };
    const report = {};
    const unavailable = [];
    const degraded = [];
    NAMES.forEach(function (name) {
        const fallback = MODELS[name].fallback;
        const healthy = count(name);
        const fallbackHealthy = fallback && model(fallback) ? count(fallback) : 0;
        report[name] = {instances: MODELS[name].instances.length, healthy: healthy, fallback: fallback || null, fallback_healthy: fallbackHealthy};
        if (healthy === 0 && fallbackHealthy === 0) {
            unavailable.push(name);
        } else if (healthy === 0) {
            degraded.push(name);
        }
    });
    const status = unavailable.length > 0 ? 'unavailable' : (degraded.length > 0 ? 'degraded' : 'ok');
    reply(r, unavailable.length > 0 ? 503 : 200, {status: status, unavailable: unavailable, served_by_fallback: degraded, models: report});
}

export default {route, models, health, modelField};
