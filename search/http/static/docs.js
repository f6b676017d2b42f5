// Starts Swagger UI on /docs. A file of its own, not an inline script, so the page's
// Content-Security-Policy can stay at script-src 'self'.
"use strict";

const container = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({
  url: new URL(container.dataset.openapiUrl, document.baseURI).href,
  dom_id: "#swagger-ui",
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
});
